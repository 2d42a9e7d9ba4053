"""An explain job's DICOM objects as ``worker.compute`` makes them: PM on the source grid, SCs, SR, and no patient data in the JSON."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pydicom
import pytest
import torch

from jobs.params import ExplainParameters
from models.data.geometry import map_to_source
from models.data.tensors import load_dicom_for_model
from models.explain.gradcam import gradcam
from tests.support.checkpoints import tiny_checkpoint
from tests.support.dciodvfy import check_with_dciodvfy, have_dciodvfy
from worker.explaining import explain_result
from worker.served import ServedModel

LIMITS = (50_000_000, 20)
MARKERS = ("Test^Patient", "PX-001", "ACC-1", "19700101")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> ServedModel:
    path = tmp_path_factory.mktemp("dicom-results") / "tiny-grey.safetensors"
    tiny_checkpoint(path, 1, 28, ["normal", "pneumonia"], seed=1)
    return ServedModel.load("tiny-grey", path, torch.device("cpu"))


@pytest.fixture(scope="module")
def xray(dicom_file) -> bytes:
    """16-bit (12 stored), 512 rows x 640 columns, with the identifiers a PACS would have."""
    yy, xx = np.mgrid[0:512, 0:640]
    disc = ((yy - 256) ** 2 + (xx - 220) ** 2 < 140**2) * 1500
    return dicom_file((xx * 4 + yy * 2 + disc).clip(0, 4095).astype(np.uint16), "MONOCHROME2", 1.0, 0.0, (1800, 3600))


def explain(served, data, rho=0.1):
    """(parameters, the result's JSON, PNGs, DICOM objects) of an explain job on ``data``."""
    parameters = ExplainParameters.build(
        targets=["predicted", "runner-up"], rho=rho, steps=3, layer=served.gradcam_layer, stability_steps=2
    )
    out = explain_result(served, data, "dicom", parameters, bound_check=False)
    return parameters.kwargs(), out.result.dump(), out.files, out.dicom_files


def test_explain_result_lists_the_pm_scs_and_sr(served, xray, tmp_path, monkeypatch):
    monkeypatch.setattr("worker.compute.upload_limits", lambda: LIMITS)
    source = pydicom.dcmread(io.BytesIO(xray))
    parameters, summary, files, dicom = explain(served, xray)
    stems = [t["image"][:-4] for t in summary["targets"]]
    expected = (
        {"gradcam_parametric_map.dcm", "gradcam_overlay.dcm", "report_pdf.dcm", "structured_report.dcm"}
        | {f"{s}.dcm" for s in stems}
        | {f"{s}_diff.dcm" for s in stems}
    )
    assert set(dicom) == set(summary["dicom_files"]) == expected
    assert all(t["dicom"] in dicom and t["dicom_difference"] in dicom for t in summary["targets"])
    listed = {o["name"]: o for o in summary["dicom_objects"]}
    assert set(listed) == expected
    for name, blob in dicom.items():
        ds = pydicom.dcmread(io.BytesIO(blob))
        entry = listed[name]
        assert (ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID) == (
            entry["sop_class_uid"],
            entry["sop_instance_uid"],
            entry["series_instance_uid"],
        )
        assert ds.PatientName == source.PatientName and ds.StudyInstanceUID == source.StudyInstanceUID
    # The job's JSON: identifiers of the objects, never the patient's.
    text = json.dumps(summary)
    assert not [m for m in MARKERS if m in text]
    assert "PatientName" not in text and "PatientID" not in text

    # The PM is the model's Grad-CAM map, resampled onto the source's 640 x 512 grid.
    pm = pydicom.dcmread(io.BytesIO(dicom["gradcam_parametric_map.dcm"]))
    assert (pm.Rows, pm.Columns) == (512, 640) == (source.Rows, source.Columns)
    assert listed["gradcam_parametric_map.dcm"]["role"] == "gradcam_parametric_map"
    x, _ = load_dicom_for_model(xray, 28, 1)
    cam = gradcam(served.model, x[None], [summary["predicted"]["class_index"]], layer=parameters["layer"])[0]
    np.testing.assert_allclose(pm.pixel_array, map_to_source(cam.numpy(), 640, 512), atol=1e-6)
    if have_dciodvfy():
        assert check_with_dciodvfy(tmp_path, dicom) == {}


def test_the_same_request_gives_the_same_uids(served, xray, monkeypatch):
    monkeypatch.setattr("worker.compute.upload_limits", lambda: LIMITS)
    first = explain(served, xray)[1]["dicom_objects"]
    again = explain(served, xray)[1]["dicom_objects"]
    other = explain(served, xray, rho=0.2)[1]["dicom_objects"]
    assert first == again
    assert not {o["sop_instance_uid"] for o in other} & {o["sop_instance_uid"] for o in first}


def test_the_result_and_the_sr_carry_each_maps_faithfulness(served, xray, monkeypatch):
    from models.explain.faithfulness import delta_map, faithfulness

    monkeypatch.setattr("worker.compute.upload_limits", lambda: LIMITS)
    parameters, summary, _files, dicom = explain(served, xray)
    cam_figures = summary["gradcam"]["faithfulness"]
    figures = [cam_figures, *(t["faithfulness"] for t in summary["targets"])]
    keys = ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc")
    for f in figures:
        assert all(0.0 <= f[k] <= 1.0 for k in keys) and len(f["deletion_curve"]) == 17
    assert cam_figures["class_index"] == summary["predicted"]["class_index"]
    assert [t["faithfulness"]["class_index"] for t in summary["targets"]] == [
        t["class_index"] for t in summary["targets"]
    ]
    provenance = summary["provenance"]
    assert provenance["method"]["faithfulness"] == summary["faithfulness"]
    assert summary["faithfulness"]["steps"] == 16 and "blurred" in summary["faithfulness"]["baseline"]
    assert "faithfulness_seconds" in provenance["timings"]
    assert "faithfulness" not in provenance["method"]["gradcam"]
    # The same figures from the parts: the map the PM holds, the model, the input.
    x, _ = load_dicom_for_model(xray, 28, 1)
    cam = gradcam(served.model, x[None], [cam_figures["class_index"]], layer=parameters["layer"])[0]
    (again,) = faithfulness(served.model, x, [cam], [cam_figures["class_index"]])
    assert again["deletion_auc"] == pytest.approx(cam_figures["deletion_auc"], abs=1e-6)
    assert again["random_insertion_auc"] == pytest.approx(cam_figures["random_insertion_auc"], abs=1e-6)
    assert delta_map(torch.zeros(1, 28, 28)).shape == (28, 28)
    # The SR: each map's group holds its four AUCs.
    sr = pydicom.dcmread(io.BytesIO(dicom["structured_report.dcm"]))
    values = [
        (item.ConceptNameCodeSequence[0].CodeValue, float(item.MeasuredValueSequence[0].NumericValue))
        for item in _items(sr.ContentSequence)
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue.endswith("-AUC")
    ]
    assert ("DELETION-AUC", pytest.approx(cam_figures["deletion_auc"])) in values
    assert len(values) == 4 * len(figures)
    params = [
        i.TextValue for i in _items(sr.ContentSequence) if i.ValueType == "TEXT" and "faithfulness" in i.TextValue
    ]
    assert params and "16 equal steps" in params[0]


def _items(items):
    for item in items:
        yield item
        yield from _items(item.get("ContentSequence", []))


def test_the_secondary_captures_hold_the_pngs_pixels(served, xray, monkeypatch):
    """The PNGs and the DICOM objects are rendered from the same arrays: each Secondary
    Capture's picture is exactly its PNG's pixels (grey repeated into RGB), each one a block of
    k x k (``models.render.capture``: enlarged to a readable size, a caption band below)."""
    from PIL import Image

    from models.render.capture import scale_factor

    monkeypatch.setattr("worker.compute.upload_limits", lambda: LIMITS)
    _parameters, summary, files, dicom = explain(served, xray)
    pairs = [("gradcam_overlay.png", "gradcam_overlay.dcm")] + [
        (t[png], t[dcm])
        for t in summary["targets"]
        for png, dcm in (("image", "dicom"), ("difference", "dicom_difference"))
    ]
    for png, dcm in pairs:
        pixels = np.asarray(Image.open(io.BytesIO(files[png])))
        pixels = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)  # SCs are RGB
        k = scale_factor(*pixels.shape[:2])
        blocks = np.repeat(np.repeat(pixels, k, axis=0), k, axis=1)
        picture = pydicom.dcmread(io.BytesIO(dicom[dcm])).pixel_array[: blocks.shape[0]]
        np.testing.assert_array_equal(picture, blocks, err_msg=dcm)


def test_malformed_patient_study_and_equipment_attributes_cost_no_object(served, tmp_path, monkeypatch, caplog):
    """Every malformed attribute of ``tests.support.malformed`` at once: the explanation
    still has every DICOM object, each accepted by dciodvfy, and the result names each
    attribute in ``dicom_warnings``; the canary in the values is nowhere in the result's JSON,
    the objects or the logs."""
    from tests.support.malformed import CANARY, EVERYTHING, malformed, source_file

    monkeypatch.setattr("worker.compute.upload_limits", lambda: LIMITS)
    data = malformed(source_file(), [(k, raw, vr) for k, (raw, vr) in EVERYTHING.items()])
    caplog.set_level(logging.DEBUG)
    _parameters, summary, _files, dicom = explain(served, data)
    stems = [t["image"][:-4] for t in summary["targets"]]
    expected = {"gradcam_parametric_map.dcm", "gradcam_overlay.dcm", "report_pdf.dcm", "structured_report.dcm"}
    assert set(dicom) == expected | {f"{s}.dcm" for s in stems} | {f"{s}_diff.dcm" for s in stems}
    assert "dicom_error" not in summary
    assert sorted(w.split(" ", 1)[0] for w in summary["dicom_warnings"]) == sorted(EVERYTHING)
    text = json.dumps(summary)
    assert CANARY[:8] not in text and CANARY[:8] not in caplog.text
    assert not [name for name, blob in dicom.items() if CANARY[:8].encode() in blob]
    if have_dciodvfy():
        assert check_with_dciodvfy(tmp_path, dicom) == {}
