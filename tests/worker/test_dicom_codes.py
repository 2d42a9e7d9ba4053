"""An explain job with the bundled pneumonia checkpoint codes its findings in SNOMED CT: the checkpoint's class -> code map reaches the SR through the worker."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import torch

from jobs.params import ExplainParameters
from tests.models.dicom.test_class_codes import finding_codes
from worker.explaining import explain_result
from worker.served import ServedModel

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "pneumonia-robust" / "model.safetensors"


def test_the_bundled_pneumonia_model_codes_its_findings_in_snomed_ct(dicom_file, monkeypatch):
    monkeypatch.setattr("worker.compute.upload_limits", lambda: (50_000_000, 20))
    served = ServedModel.load("pneumonia-robust", CHECKPOINT, torch.device("cpu"))
    yy, xx = np.mgrid[0:96, 0:96]
    data = dicom_file(((xx * 30 + yy * 11) % 4096).astype(np.uint16), "MONOCHROME2")
    parameters = ExplainParameters.build(
        targets=["predicted"], rho=0.1, steps=2, layer=served.gradcam_layer, stability_steps=2
    )
    out = explain_result(served, data, "dicom", parameters, bound_check=False)
    sr = pydicom.dcmread(io.BytesIO(out.dicom_files["structured_report.dcm"]))
    coded = finding_codes(sr)
    assert coded[("SCT", "233604007")] == "Pneumonia" and coded[("SCT", "17621005")] == "Normal"
    assert not {value for scheme, value in coded if scheme == "99AEX"} & {"normal", "pneumonia"}
