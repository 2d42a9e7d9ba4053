"""DICOM in and out, on pydicom's bundled files and on files written from real X-rays."""

import io

import numpy as np
import pydicom
import pytest

from models.data.imaging import block_mean, reduction_factor, resize_center
from models.data.tensors import load_dicom_for_model
from models.dicom.equipment import Provenance
from models.dicom.pixels import is_dicom, load_dicom_pixels, window_linear
from models.dicom.reading import HEADER_ALLOWANCE
from models.dicom.sanitize import Finding, usable_source
from models.dicom.secondary_capture import VOI_AND_RESCALE, secondary_captures
from models.dicom.uids import derived_uid, device_uid, result_uids
from models.errors import (
    AexError,
    BadParameterError,
    DecompressionBombError,
    ExtremeAspectRatioError,
    InvalidDicomError,
    NonFinitePixelsError,
    UnsupportedMediaError,
)
from tests.support.dciodvfy import check_with_dciodvfy, have_dciodvfy, require_dciodvfy
from tests.support.hostile import OK, deflated, dicom, dicom_cases, set_raw


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
    require_dciodvfy()
    source = pydicom.dcmread(io.BytesIO(bundled(name)))
    objs = secondary_captures(
        source, [("a", np.random.default_rng(1).random((32, 32, 3))), ("b", np.zeros((32, 32)))], "m"
    )
    assert check_with_dciodvfy(tmp_path, {f"{n}.dcm": blob for n, blob in objs}) == {}


def lut_item(bits: int = 16) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.LUTDescriptor = [4, 0, bits]
    item.LUTData = [0, 100, 200, 300]
    return item


def test_secondary_captures_carry_no_voi_or_rescale_and_the_model_as_equipment(tmp_path, xray, write_dicom):
    source = pydicom.dcmread(
        io.BytesIO(write_dicom(xray.astype(np.uint16) * 16, "MONOCHROME2", 0.5, -100.0, (400, 900)))
    )
    source.VOILUTSequence = [lut_item()]
    source.ModalityLUTSequence = [lut_item()]
    source.VOILUTFunction, source.RescaleType = "LINEAR", "HU"
    sha = "ab" * 32
    provenance = Provenance("tiny-grey", sha)
    params = {"rho": 0.1}
    objs = secondary_captures(
        source,
        [("overlay", np.random.default_rng(0).random((28, 28, 3))), ("diff", np.full((28, 28), 0.5))],
        "model m; Grad-CAM",
        provenance=provenance,
        uid=result_uids(source.SOPInstanceUID, sha, params),
    )
    for name, blob in objs:
        sc = pydicom.dcmread(io.BytesIO(blob))
        assert not [k for k in VOI_AND_RESCALE if k in sc], name
        for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "VOILUTSequence"):
            assert keyword not in sc, (name, keyword)
        assert "ModalityLUTSequence" not in sc
        assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
        assert sc.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert "not for diagnostic use" in sc.SeriesDescription
        (aex,) = [e for e in sc.ContributingEquipmentSequence if e.Manufacturer == "aex"]
        assert (aex.ManufacturerModelName, aex.DeviceUID) == ("tiny-grey", device_uid(sha))
        assert aex.SoftwareVersions.startswith("aex ")
        assert sc.SOPInstanceUID == derived_uid(source.SOPInstanceUID, sha, params, f"instance/sc/{name}")
        assert sc.SeriesInstanceUID == derived_uid(source.SOPInstanceUID, sha, params, "series/sc")
    if have_dciodvfy():
        assert check_with_dciodvfy(tmp_path, {f"{n}.dcm": blob for n, blob in objs}) == {}


def test_usable_source_empties_what_does_not_parse_without_quoting_it(xray, write_dicom):
    source = pydicom.dcmread(io.BytesIO(write_dicom(xray.astype(np.uint16), "MONOCHROME2")))
    with pytest.warns(UserWarning):  # pydicom's, as it would warn reading such a file
        source.PatientBirthDate = "19XX0101"
    checked = usable_source(source)
    usable = checked.dataset
    assert checked.findings == (Finding("PatientBirthDate", "emptied"),)
    assert usable.PatientBirthDate == "" and "PixelData" not in usable and "19XX" not in checked.warnings[0]
    assert source.PatientBirthDate == "19XX0101"  # the source itself is left as it is


# --- Hostile DICOM: one check for the API and the worker, named attributes, bounded memory ----

HOSTILE_DICOM = [c for c in dicom_cases() if c.expect != (OK,) and not c.name.startswith("dicom-cut-")]
LIMITS = dict(max_pixels=50_000_000, max_aspect=20)


@pytest.mark.parametrize("case", HOSTILE_DICOM, ids=[c.name for c in HOSTILE_DICOM])
def test_malformed_modules_are_refused_the_same_way_by_the_api_and_the_worker(case):
    with pytest.raises(AexError) as api:
        load_dicom_pixels(case.data, None, **LIMITS)  # what service.uploads.check_dicom runs
    with pytest.raises(AexError) as worker:
        load_dicom_for_model(case.data, 32, 3, None, **LIMITS)  # what worker.compute.load_input runs
    assert api.value.code == worker.value.code and api.value.code in case.expect, api.value.message
    assert not any(p in api.value.message for p in ("PX-HOSTILE", "Hostile", "Doe", "John")), api.value.message


@pytest.mark.parametrize(
    "name, keyword",
    [
        ("dicom-palette-no-luts", "RedPaletteColorLookupTableDescriptor"),
        ("dicom-palette-no-lut-data", "RedPaletteColorLookupTableData"),
        ("dicom-voi-lut-no-descriptor", "LUTDescriptor of VOILUTSequence"),
        ("dicom-modality-lut-no-descriptor", "LUTDescriptor of ModalityLUTSequence"),
        ("dicom-WindowCenter-text", "WindowCenter"),
        ("dicom-WindowWidth-nan", "WindowWidth"),
        ("dicom-RescaleSlope-text", "RescaleSlope"),
        ("dicom-pixel-data-long", "PixelData"),
        ("dicom-pixel-data-short", "PixelData"),
        ("dicom-frames-text", "NumberOfFrames"),
        ("dicom-bits-allocated-7", "BitsAllocated"),
    ],
)
def test_refusals_name_the_attribute_never_its_value(name, keyword):
    case = next(c for c in dicom_cases() if c.name == name)
    with pytest.raises(InvalidDicomError) as info:
        load_dicom_pixels(case.data)
    assert keyword in info.value.message and "Doe" not in info.value.message


def test_non_finite_values_after_the_modality_lut_are_counted():
    stored = np.arange(16, dtype=np.uint16).reshape(4, 4)
    data = set_raw(dicom(stored), 0x0028, 0x1053, b"DS", b"1e308")  # RescaleSlope: 1e308 x 2 and up overflow
    with pytest.raises(NonFinitePixelsError) as info:
        load_dicom_pixels(data)
    assert "14 of the 16" in info.value.message and "0 NaN, 14 +inf, 0 -inf" in info.value.message


def test_a_window_override_must_be_finite():
    for window in ((float("nan"), 100.0), (10.0, float("inf")), (10.0, 0.5)):
        with pytest.raises(BadParameterError):
            load_dicom_pixels(dicom(), window)


def test_deflated_data_set_reads_as_its_inflated_self():
    plain = load_dicom_pixels(dicom(np.zeros((64, 64), np.uint16)))
    inflated = load_dicom_pixels(deflated(64 * 64 * 2))
    np.testing.assert_array_equal(inflated.pixels, plain.pixels)
    assert inflated.dataset.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian


def test_deflate_bomb_is_refused_while_inflating():
    import tracemalloc

    bomb = deflated(64 << 20)  # 64 MiB of pixel data for a 64 x 64 image, in about 64 KB
    assert len(bomb) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionBombError, match="inflates past"):
            load_dicom_pixels(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * HEADER_ALLOWANCE, peak  # its header allowance, never the 64 MiB
    with pytest.raises(DecompressionBombError, match="AEX_MAX_IMAGE_PIXELS"):
        load_dicom_pixels(deflated(64, 20000, 20000), max_pixels=50_000_000)  # refused from the header


def test_decoded_size_limit_before_any_pixel_is_decoded():
    with pytest.raises(DecompressionBombError, match="AEX_MAX_IMAGE_PIXELS"):
        load_dicom_pixels(dicom(np.zeros((64, 64), np.uint16)), max_pixels=64 * 63)
    with pytest.raises(ExtremeAspectRatioError):
        load_dicom_pixels(dicom(np.zeros((2, 64), np.uint16)), max_aspect=20)


def test_strips_and_regions_are_the_pixels(write_dicom, xray):
    stored = np.kron(xray.astype(np.uint16) * 16, np.ones((9, 7), np.uint16))  # 252 x 196
    image = load_dicom_pixels(write_dicom(stored, "MONOCHROME1", 0.5, -100.0, (400.0, 900.0)))
    full = image.pixels
    assert full.shape == (252, 196, 1) and image.size == (196, 252)
    region = np.concatenate(list(image.strips((10, 20, 150, 200), rows=7)), axis=0)
    np.testing.assert_array_equal(region, full[20:200, 10:150])
    x, _ = load_dicom_for_model(write_dicom(stored, "MONOCHROME1", 0.5, -100.0, (400.0, 900.0)), 28, 1)
    k = reduction_factor(196, 252, 28)
    expected = resize_center(block_mean(full, k), 28)
    np.testing.assert_allclose(x.numpy()[0], expected[..., 0], atol=1e-5)
