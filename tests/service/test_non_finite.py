"""Finite numbers only, through the API and real worker processes (marker e2e): images at the
edges of their ranges (the audit's float32 TIFF with +-3.4e38 side by side, uint32 and int32
extremes, subnormals, DICOM with Rescale Slope/Intercept of +-1e308) finish with every number
finite; the network's input is checked at admission (a scaling that overflowed would be 422
invalid_model_input, nothing queued); and a real checkpoint whose computation goes NaN ends each
job failed with non_finite_result, with no result and no null anywhere, never finished."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.data import imaging
from models.dicom import pixels
from tests.support.dicom import write_dicom
from tests.support.edge_images import F32_MAX, F32_TINY, bands, nan_checkpoint, raw_tiff, unexpected_nulls
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e

DB = 10  # no other test uses it
MODEL = "tiny-grey"


def upload(data: bytes, name: str, **fields):
    media = "application/dicom" if name.endswith(".dcm") else "application/octet-stream"
    return {"files": {"image": (name, data, media)}, "data": {"model": MODEL, **{k: str(v) for k, v in fields.items()}}}


EDGES = {
    "float32 +-max": (raw_tiff(bands((F32_MAX, -F32_MAX, 0.0), np.float32, height=40, width=12)), "x.tif"),
    "float32 subnormals": (raw_tiff(bands((F32_TINY, -F32_TINY, 0.0), np.float32, height=40, width=12)), "x.tif"),
    "uint32 extremes": (raw_tiff(bands((2**32 - 1, 0, 2**31), np.uint32, height=40, width=12)), "x.tif"),
    "int32 extremes": (raw_tiff(bands((2**31 - 1, -(2**31), 0), np.int32, height=40, width=12)), "x.tif"),
    "dicom slope 1e308, intercept -1e308": (
        write_dicom(bands((1, 0, 1), np.uint16, height=40, width=12), "MONOCHROME2", 1e308, -1e308),
        "x.dcm",
    ),
}


def finished(client, poll, resp) -> dict:
    assert resp.status_code in (200, 202), resp.text
    view = resp.json() if resp.status_code == 200 else poll(client, resp.headers["location"])
    assert view["status"] == "finished", view
    return view["result"]


@pytest.mark.parametrize("name", list(EDGES))
def test_uploads_at_the_edges_of_their_ranges_finish_with_finite_numbers(api, poll, name):
    data, filename = EDGES[name]
    result = finished(api, poll, api.post("/v1/classify", **upload(data, filename, stability="true")))
    assert all(isinstance(p, float) for p in result["probs"].values()), result["probs"]
    assert unexpected_nulls(result) == []
    if name in ("float32 +-max", "dicom slope 1e308, intercept -1e308"):
        result = finished(api, poll, api.post("/v1/explain", **upload(data, filename, targets="predicted", steps=3)))
        assert unexpected_nulls(result) == []


def test_a_tiff_whose_samples_cannot_be_read_is_a_415_naming_them(api):
    data = raw_tiff(bands((1e308, -1e308, 0.0), np.float64, height=40, width=12))
    resp = api.post("/v1/classify", **upload(data, "x.tif"))
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"
    assert "TIFF whose samples" in resp.json()["error"]["message"]


def old_scaling(dtype):
    """The scalings the service used before: images in float32 (+-3.4e38 overflow), DICOM in
    float64 without halving (a span over 1.8e308 overflows); then inf / inf is NaN."""

    def scale(values, lo, hi):
        with np.errstate(all="ignore"):
            values = np.asarray(values, dtype=dtype)
            return (values - dtype(lo)) / (dtype(hi) - dtype(lo))

    return scale


@pytest.mark.parametrize("route", ["/v1/classify", "/v1/explain"])
def test_admission_refuses_a_network_input_that_is_not_finite(api, monkeypatch, route):
    # The API's own process: were its scaling to overflow again, the network's input check at
    # admission refuses the upload before anything is queued.
    monkeypatch.setattr(imaging, "unit_range", old_scaling(np.float32))
    monkeypatch.setattr(pixels, "unit_range", old_scaling(np.float64))
    signed = dicom_with_signed(write_dicom(np.zeros((40, 36)), "MONOCHROME2", 8e304, 0.0))
    fields = {"targets": "predicted", "steps": 3} if route == "/v1/explain" else {}
    for data, filename in (EDGES["float32 +-max"], (signed, "x.dcm")):
        resp = api.post(route, **upload(data, filename, **fields))
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["code"] == "invalid_model_input" and "not finite" in error["message"]
        assert "location" not in resp.headers


def dicom_with_signed(data: bytes) -> bytes:
    """``data`` with signed samples 2047, -2048 and 0 in three bands: x 8e304 they span 3.3e308."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelRepresentation, ds.PixelData = 1, bands((2047, -2048, 0), "<i2", height=40, width=12).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def nan_models(tmp_path_factory):
    """A model folder with two checkpoints whose computation goes NaN (``nan_checkpoint``)."""
    folder = tmp_path_factory.mktemp("nan-models")
    for kind in ("inf-weights", "backward-overflow"):
        nan_checkpoint(folder / f"{kind}.safetensors", kind)
    return folder


def failed(client, poll, resp, expect_sync: bool) -> dict:
    """The failed job of ``resp`` (a sync classify answers with the error at once)."""
    if expect_sync:
        assert resp.status_code == 422, (
            resp.text
        )  # the status of non_finite_result: the input cannot be answered with finite numbers
        body = resp.json()
        assert body["error"]["code"] == "non_finite_result" and body["job"]["status"] == "failed"
        view = client.get(body["job"]["url"]).json()
    else:
        assert resp.status_code == 202, resp.text
        view = poll(client, resp.headers["location"])
    assert view["status"] == "failed" and view["error"]["code"] == "non_finite_result", view
    assert view.get("result") is None and not view.get("images") and not view.get("dicom"), view
    assert "probs" not in json.dumps(view) and "prob" not in json.dumps(view), "no probability, null or not"
    return view


def test_a_model_that_computes_nan_fails_its_jobs_with_non_finite_result(settings_for, start_workers, nan_models, poll):
    settings = settings_for(DB, model_dirs=[nan_models])
    start_workers(settings, 1)
    png = raw_tiff(bands((200, 0, 100), np.uint8, height=40, width=12))
    with api_client(settings) as client:
        # NaN logits: caught before anything is computed from them, in classify and explain.
        files = upload(png, "x.tif")
        files["data"]["model"] = "inf-weights"
        view = failed(client, poll, client.post("/v1/classify", **files), expect_sync=True)
        assert "logits" in view["error"]["message"]
        files["data"].update(targets="predicted", steps="3")
        view = failed(client, poll, client.post("/v1/explain", **files), expect_sync=False)
        assert "logits" in view["error"]["message"]
        # Finite logits, NaN gradients: the classification stands, the explanation fails before
        # any of its pictures is rendered.
        files = upload(png, "x.tif")
        files["data"]["model"] = "backward-overflow"
        result = finished(client, poll, client.post("/v1/classify", **files))
        assert unexpected_nulls(result) == []
        files["data"].update(targets="predicted,runner-up", steps="3")
        view = failed(client, poll, client.post("/v1/explain", **files), expect_sync=False)
        assert "of the explanation holds" in view["error"]["message"]
