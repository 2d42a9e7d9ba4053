"""DICOM in and out, on pydicom's bundled files and on files written from real X-rays."""

import io
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from models.dicom.pixels import is_dicom, load_dicom_pixels, window_linear
from models.dicom.secondary_capture import secondary_captures
from models.errors import UnsupportedMediaError


@pytest.fixture(scope="module")
def bundled(pydicom_file):
    return pydicom_file


@pytest.fixture(scope="module")
def write_dicom(dicom_file):
    return dicom_file


@pytest.fixture(scope="module")
def xray(pneumonia_npz) -> np.ndarray:
    return np.load(pneumonia_npz)["test_images"][0]  # uint8 28 x 28


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_pixels_match_hand_computation(xray, write_dicom, photometric):
    stored = xray.astype(np.uint16) * 16  # 12-bit values
    slope, intercept, center, width = 0.5, -100.0, 400.0, 900.0
    data = write_dicom(stored, photometric, slope, intercept, (center, width))
    assert is_dicom(data)
    got = load_dicom_pixels(data)
    hu = stored.astype(np.float64) * slope + intercept
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    if photometric == "MONOCHROME1":
        expected = 1 - expected
    assert got.pixels.shape == (28, 28, 1)
    np.testing.assert_allclose(got.pixels[..., 0], expected, atol=1e-6)
    assert got.window == (center, width)


def test_window_override_and_no_window(xray, write_dicom):
    stored = xray.astype(np.uint16) * 16
    data = write_dicom(stored, "MONOCHROME2", 1.0, 0.0, (2048.0, 4096.0))
    got = load_dicom_pixels(data, window=(1000.0, 500.0))
    expected = np.clip((stored - 999.5) / 499.0 + 0.5, 0, 1)
    np.testing.assert_allclose(got.pixels[..., 0], expected, atol=1e-6)
    plain = load_dicom_pixels(write_dicom(stored, "MONOCHROME2"))
    lo, hi = stored.min(), stored.max()
    np.testing.assert_allclose(plain.pixels[..., 0], (stored - lo) / (hi - lo), atol=1e-6)


def test_window_function_edges():
    x = np.array([0.0, 99.5, 100.0, 1000.0])
    np.testing.assert_allclose(window_linear(x, 100.0, 1.0), [0, 0, 1, 1])
    assert window_linear(np.array([100.0]), 100.0, 50.0, "SIGMOID")[0] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_bundled_files_decode(bundled, name):
    got = load_dicom_pixels(bundled(name))
    assert got.pixels.ndim == 3 and got.pixels.shape[-1] in (1, 3)
    assert got.pixels.min() >= 0.0 and got.pixels.max() <= 1.0


@pytest.mark.parametrize(
    "name, reason",
    [
        ("SC_rgb_rle_2frame.dcm", "multi-frame"),
        ("rtplan.dcm", "no pixel data"),
        ("JPEG-lossy.dcm", "compressed transfer syntax"),
    ],
)
def test_refusals_name_the_reason(bundled, name, reason):
    with pytest.raises(UnsupportedMediaError, match=reason):
        load_dicom_pixels(bundled(name))


def test_not_dicom():
    assert not is_dicom(b"\x89PNG\r\n")
    with pytest.raises(UnsupportedMediaError):
        load_dicom_pixels(b"\0" * 128 + b"DICM" + b"garbage")


def test_secondary_capture_references_source(tmp_path, xray, write_dicom):
    source = pydicom.dcmread(io.BytesIO(write_dicom(xray.astype(np.uint16) * 16, "MONOCHROME2")))
    overlay = np.random.default_rng(0).random((28, 28, 3))
    ((name, blob),) = secondary_captures(source, [("gradcam_overlay", overlay)], "model m; Grad-CAM")
    sc = pydicom.dcmread(io.BytesIO(blob))
    assert name == "gradcam_overlay"
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == "PX-001"
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "Grad-CAM" in sc.DerivationDescription
    assert sc.pixel_array.shape == (28, 28, 3)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_dciodvfy_reports_no_errors(tmp_path, bundled, name):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools; .ci/run installs it)")
    source = pydicom.dcmread(io.BytesIO(bundled(name)))
    objs = secondary_captures(
        source, [("a", np.random.default_rng(1).random((32, 32, 3))), ("b", np.zeros((32, 32)))], "m"
    )
    for obj_name, blob in objs:
        path = tmp_path / f"{obj_name}.dcm"
        path.write_bytes(blob)
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors
