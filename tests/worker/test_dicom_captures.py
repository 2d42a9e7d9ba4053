"""An explain job's Secondary Captures at a readable size: the bundled 28 x 28 model's pictures enlarged by whole-pixel blocks (at least 512 px), captioned with the model's input size, Burned In Annotation YES; its PNGs keep the model's size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image

from jobs.params import ExplainParameters
from models.render.capture import MIN_LONG_SIDE, scale_factor
from tests.support.dciodvfy import check_with_dciodvfy, require_dciodvfy
from worker.explaining import explain_result
from worker.served import ServedModel

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "pneumonia-robust" / "model.safetensors"


def test_secondary_captures_are_enlarged_by_blocks_and_captioned(dicom_file, monkeypatch, tmp_path):
    require_dciodvfy()
    monkeypatch.setattr("worker.compute.upload_limits", lambda: (50_000_000, 20))
    served = ServedModel.load("pneumonia-robust", CHECKPOINT, torch.device("cpu"))
    yy, xx = np.mgrid[0:96, 0:80]
    data = dicom_file(((xx * 30 + yy * 11) % 4096).astype(np.uint16), "MONOCHROME2")
    parameters = ExplainParameters.build(
        targets=["predicted", "runner-up"], rho=0.1, steps=2, layer=served.gradcam_layer, stability_steps=2
    )
    out = explain_result(served, data, "dicom", parameters, bound_check=False)
    k = scale_factor(28, 28)
    captures = 0
    for name, blob in out.dicom_files.items():
        ds = pydicom.dcmread(io.BytesIO(blob))
        if ds.SOPClassUID != pydicom.uid.SecondaryCaptureImageStorage:
            continue
        captures += 1
        assert ds.Columns == 28 * k and ds.Rows > 28 * k and max(ds.Rows, ds.Columns) >= MIN_LONG_SIDE, name
        assert ds.BurnedInAnnotation == "YES"
        png = np.asarray(Image.open(io.BytesIO(out.files[name[: -len(".dcm")] + ".png"])).convert("RGB"))
        assert png.shape[:2] == (28, 28)  # the job's PNGs keep the model's size
        np.testing.assert_array_equal(ds.pixel_array[: 28 * k], np.repeat(np.repeat(png, k, axis=0), k, axis=1))
    assert captures == 5  # the overlay, and x + delta and delta of two targets
    assert check_with_dciodvfy(tmp_path, out.dicom_files) == {}
