"""DICOM through the service: real DICOM files in (pydicom's bundled ones and 16-bit files
written from PneumoniaMNIST X-rays), the model's probabilities on hand-computed pixels,
refusals with their reason, and the DICOM objects out (Secondary Captures, Parametric Map, SR)
that dciodvfy accepts and that reference their source (real Redis, real worker processes; marker e2e)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import torch

from models.data.tensors import load_dicom_for_model
from models.store.checkpoint import load_checkpoint
from tests.support.dciodvfy import SKIP_REASON, dciodvfy_errors, have_dciodvfy
from tests.support.require import missing

pytestmark = pytest.mark.e2e


def upload(data: bytes, name: str = "image.dcm", media_type: str = "application/octet-stream", **fields):
    return {"files": {"image": (name, data, media_type)}, "data": {k: str(v) for k, v in fields.items()}}


def checkpoint(models_dir, name: str):
    path = models_dir / name / "model.safetensors"
    return load_checkpoint(path if path.exists() else models_dir / f"{name}.safetensors")


def model_probs(models_dir, name: str, x: torch.Tensor) -> np.ndarray:
    model, _ = checkpoint(models_dir, name)
    with torch.no_grad():
        return model(x[None]).softmax(1)[0].numpy()


def assert_probs(result: dict, expected: np.ndarray) -> None:
    got = list(result["probs"].values())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def xray(pneumonia_npz) -> np.ndarray:
    return np.load(pneumonia_npz)["test_images"][3]  # uint8 28 x 28, a real chest X-ray


SLOPE, INTERCEPT, CENTER, WIDTH = 0.5, -100.0, 400.0, 900.0


def by_hand(stored: np.ndarray, photometric: str, center: float = CENTER, width: float = WIDTH) -> np.ndarray:
    """PS3.3 C.11: rescale, linear VOI window to [0, 1], MONOCHROME1 inverted."""
    values = stored.astype(np.float64) * SLOPE + INTERCEPT
    out = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return 1.0 - out if photometric == "MONOCHROME1" else out


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_classify_sees_the_hand_computed_pixels(api, service_models, dicom_file, xray, photometric):
    stored = xray.astype(np.uint16) * 16  # 12-bit values in 16-bit words
    data = dicom_file(stored, photometric, SLOPE, INTERCEPT, (CENTER, WIDTH))
    resp = api.post("/v1/classify", **upload(data, model="tiny-grey"))
    assert resp.status_code == 200, resp.text
    result = resp.json()["result"]
    x = torch.from_numpy(by_hand(stored, photometric).astype(np.float32))[None]
    assert_probs(result, model_probs(service_models, "tiny-grey", x))
    info = result["provenance"]["input"]
    assert info["format"] == "dicom" and info["photometric_interpretation"] == photometric
    assert info["window"] == [CENTER, WIDTH] and info["inverted"] == (photometric == "MONOCHROME1")
    assert info["rescale_slope"] == SLOPE and info["bits_stored"] == 12
    assert "PatientID" not in str(result) and "PX-001" not in str(result)  # no identifiers in the JSON

    # The window override replaces the file's; found by its DICM header under any name and type.
    resp = api.post("/v1/classify", **upload(data, "scan.bin", model="tiny-grey", window_center=200, window_width=300))
    assert resp.status_code == 200, resp.text
    x = torch.from_numpy(by_hand(stored, photometric, 200.0, 300.0).astype(np.float32))[None]
    assert_probs(resp.json()["result"], model_probs(service_models, "tiny-grey", x))
    assert resp.json()["result"]["provenance"]["parameters"]["window"] == [200.0, 300.0]


@pytest.mark.parametrize(
    "name,model",
    [
        ("CT_small.dcm", "tiny-grey"),
        ("MR_small.dcm", "tiny-grey"),
        ("SC_rgb_rle.dcm", "tiny-rgb"),
        ("SC_rgb_jpeg_dcmtk.dcm", "tiny-rgb"),
        ("CT_small.dcm", "tiny-rgb"),
    ],
)
def test_bundled_files_classify(api, service_models, pydicom_file, name, model):
    data = pydicom_file(name)
    resp = api.post("/v1/classify", **upload(data, name, "application/dicom", model=model))
    assert resp.status_code == 200, resp.text
    _, meta = checkpoint(service_models, model)
    x, _ = load_dicom_for_model(data, meta.input_size, meta.in_channels)
    assert_probs(resp.json()["result"], model_probs(service_models, model, x))


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/explain"])
@pytest.mark.parametrize(
    "name,reason",
    [
        ("SC_rgb_rle_2frame.dcm", "multi-frame"),
        ("rtplan.dcm", "no pixel data"),
        ("JPEG-lossy.dcm", "compressed transfer syntax"),
    ],
)
def test_refused_files_name_the_reason(api, pydicom_file, path, name, reason):
    resp = api.post(path, **upload(pydicom_file(name), name, model="tiny-grey"))
    assert resp.status_code == 415, resp.text
    err = resp.json()["error"]
    assert err["code"] == "unsupported_media_type" and reason in err["message"]


def test_bad_dicom_requests(api, dicom_file, make_image):
    data = dicom_file(np.full((28, 28), 100, np.uint16), "MONOCHROME2")
    one = api.post("/v1/classify", **upload(data, model="tiny-grey", window_center=10))
    assert one.status_code == 400 and "window_width" in one.json()["error"]["message"]
    png = api.post(
        "/v1/classify", **upload(make_image("PNG", "L"), "x.png", model="tiny-grey", window_center=1, window_width=2)
    )
    assert png.status_code == 400 and "DICOM input only" in png.json()["error"]["message"]
    narrow = api.post("/v1/classify", **upload(data, model="tiny-grey", window_center=1, window_width=0.5))
    assert narrow.status_code == 400, narrow.text
    named = api.post("/v1/classify", **upload(b"not dicom at all" * 20, "scan.dcm", model="tiny-grey"))
    assert named.status_code == 415 and "DICOM" in named.json()["error"]["message"]


SC_ROLES = ("gradcam_overlay", "explanation", "explanation_difference")


def test_explain_returns_secondary_captures_in_the_source_study(api, service_models, dicom_file, xray, poll, tmp_path):
    stored = xray.astype(np.uint16) * 16
    data = dicom_file(stored, "MONOCHROME1", SLOPE, INTERCEPT, (CENTER, WIDTH))
    source = pydicom.dcmread(io.BytesIO(data))
    resp = api.post("/v1/explain", **upload(data, model="tiny-grey", targets="predicted,runner-up", steps=5))
    assert resp.status_code == 202, resp.text
    view = poll(api, resp.headers["location"])
    assert view["status"] == "finished", view
    result = view["result"]
    x = torch.from_numpy(by_hand(stored, "MONOCHROME1").astype(np.float32))[None]
    assert_probs(result, model_probs(service_models, "tiny-grey", x))

    names = set(view["dicom"])
    stems = [t["image"][:-4] for t in result["targets"]]
    captures = {"gradcam_overlay.dcm"} | {f"{s}.dcm" for s in stems} | {f"{s}_diff.dcm" for s in stems}
    # The Secondary Captures, the Grad-CAM Parametric Map, the PDF report and the SR that describes them.
    assert names == captures | {"gradcam_parametric_map.dcm", "report_pdf.dcm", "structured_report.dcm"}
    roles = {o["name"]: o["role"] for o in result["dicom_objects"]}
    assert {n for n, r in roles.items() if r in SC_ROLES} == captures
    assert all(t["dicom_url"] in view["dicom"].values() for t in result["targets"])
    series = set()
    for name, url in view["dicom"].items():
        resp = api.get(url)
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/dicom"
        ds = pydicom.dcmread(io.BytesIO(resp.content))
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        if have_dciodvfy():
            (tmp_path / name).write_bytes(resp.content)
            assert dciodvfy_errors(tmp_path / name) == [], name
        if name not in captures:
            continue
        sc = ds
        assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        ref = sc.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == source.SOPClassUID
        assert "tiny-grey" in sc.DerivationDescription and "Grad-CAM" in sc.DerivationDescription
        assert "Adversarial explanations" in sc.DerivationDescription
        # the 28 x 28 picture in blocks of 19 (at least 512 px), its caption band below
        rows, columns, samples = sc.pixel_array.shape
        assert (columns, samples, sc.BurnedInAnnotation) == (28 * 19, 3, "YES") and rows > 28 * 19
        series.add(sc.SeriesInstanceUID)
    assert len(series) == 1  # one new series of Secondary Captures beside the original
    pm = pydicom.dcmread(io.BytesIO(api.get(view["dicom"]["gradcam_parametric_map.dcm"]).content))
    assert pm.SOPClassUID == pydicom.uid.ParametricMapStorage and (pm.Rows, pm.Columns) == (source.Rows, source.Columns)
    sr = pydicom.dcmread(io.BytesIO(api.get(view["dicom"]["structured_report.dcm"]).content))
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and sr.VerificationFlag == "UNVERIFIED"
    assert "Test^Patient" not in str(view) and "PX-001" not in str(view)  # no patient data in the job's JSON
    if not have_dciodvfy():
        missing(f"{SKIP_REASON}: the objects were checked with pydicom only")


def test_no_dicom_outputs_for_image_input(api, make_image, poll):
    resp = api.post(
        "/v1/explain",
        **upload(make_image("PNG", "L", seed=11), "x.png", model="tiny-grey", targets="predicted", steps=3),
    )
    view = poll(api, resp.headers["location"])
    assert view["status"] == "finished" and view["dicom"] is None and "dicom_files" not in view["result"]
    assert api.get(f"{view['url']}/dicom/gradcam_overlay.dcm").status_code == 404
    assert api.get(f"{view['url']}/dicom/..%2Fsecret").status_code == 404
