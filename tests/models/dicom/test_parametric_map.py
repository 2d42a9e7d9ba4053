"""The Grad-CAM Parametric Map: the source's own pixel grid, the inverse of the model's resize and crop, its codes."""

import io

import numpy as np
import pydicom
import pytest

from models.data.geometry import map_to_source, source_crop_box
from models.data.imaging import block_mean, prepare_region
from models.dicom.equipment import Provenance
from models.dicom.parametric_map import geometry_source, parametric_map
from models.dicom.secondary_capture import part10
from models.dicom.uids import device_uid, result_uids
from tests.support.dciodvfy import dciodvfy_errors, require_dciodvfy

SHA = "c0ffee" * 10 + "beef"
PARAMETERS = {
    "targets": ["predicted"],
    "rho": 0.1,
    "steps": 5,
    "layer": "layer3",
    "stability_steps": 20,
    "window": None,
}


@pytest.fixture(scope="module")
def xray16(dicom_file):
    """A 16-bit (12 bits stored) 512 rows x 640 columns X-ray-like source: gradients and a disc."""
    yy, xx = np.mgrid[0:512, 0:640]
    disc = ((yy - 256) ** 2 + (xx - 200) ** 2 < 120**2) * 1500
    pixels = (xx * 4 + yy * 2 + disc).clip(0, 4095).astype(np.uint16)
    return pydicom.dcmread(io.BytesIO(dicom_file(pixels, "MONOCHROME2", 1.0, -1024.0, (600.0, 3000.0))))


def cam28() -> np.ndarray:
    return np.random.default_rng(7).random((28, 28)).astype(np.float32)


def build(source, values, sha=SHA):
    provenance = Provenance("tiny-grey", sha)
    pm = parametric_map(source, values, provenance, result_uids(source.SOPInstanceUID, sha, PARAMETERS), "Grad-CAM")
    return pydicom.dcmread(io.BytesIO(part10(pm)))


def hand_bilinear(grid: np.ndarray, u: float, v: float) -> float:
    """Bilinear interpolation at model-grid coordinates (u: column, v: row), edges held."""
    n = grid.shape[0]
    u, v = min(max(u, 0.0), n - 1.0), min(max(v, 0.0), n - 1.0)
    c0, r0 = int(np.floor(u)), int(np.floor(v))
    c1, r1 = min(c0 + 1, n - 1), min(r0 + 1, n - 1)
    a, b = u - c0, v - r0
    top = grid[r0, c0] * (1 - a) + grid[r0, c1] * a
    bottom = grid[r1, c0] * (1 - a) + grid[r1, c1] * a
    return float(top * (1 - b) + bottom * b)


def test_crop_box_of_a_non_square_source_by_hand():
    # 640 x 512 with a 28 input: block-averaged by 4 (512 // 112) to 160 x 128, whose shorter
    # side is resized to 28 (the longer to round(160 * 28 / 128) = 35), then 3 columns cut on
    # the left: the kept columns are 3 .. 31 of 35, i.e. 3 * 160 / 35 .. 31 * 160 / 35 reduced
    # pixels, times 4 in source pixels; all rows are kept.
    left, top, right, bottom = source_crop_box(640, 512, 28)
    assert (top, bottom) == (0.0, 512.0)
    assert left == pytest.approx(3 * 160 / 35 * 4) and right == pytest.approx(31 * 160 / 35 * 4)
    assert source_crop_box(28, 28, 28) == (0.0, 0.0, 28.0, 28.0)


@pytest.mark.parametrize("width, height", [(640, 512), (512, 640), (300, 90), (28, 28)])
def test_inverse_geometry_agrees_with_the_forward_path(width, height):
    # A ramp of each pixel centre's column / row coordinate goes through the model's own
    # preprocessing (``prepare_region``: block average, bicubic resize, centre crop); the
    # model-grid ramp, resampled back by ``map_to_source``, is the source's ramp again
    # (linear functions survive both resamplings away from the image's edges).
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    ramps = np.stack([xx / width, yy / height], axis=-1).astype(np.float32)

    def read(box, k):
        left, top, right, bottom = box
        return block_mean(ramps[top:bottom, left:right], k)

    model = prepare_region(width, height, read, 28, 2)
    left, top, right, bottom = source_crop_box(width, height, 28)
    # Away from the image's edges (the bicubic filter reads up to 2 model pixels around it).
    step_x, step_y = (right - left) / 28, (bottom - top) / 28
    inner_x = (xx[0] > left + 3 * step_x) & (xx[0] < right - 3 * step_x)
    inner_y = (yy[:, 0] > top + 3 * step_y) & (yy[:, 0] < bottom - 3 * step_y)
    sel = np.ix_(inner_y, inner_x)
    for c, coord, scale, step in ((0, xx, width, step_x), (1, yy, height, step_y)):
        back = map_to_source(model[..., c], width, height)
        np.testing.assert_allclose(back[sel] * scale, coord[sel], atol=0.01 * max(1.0, step))


def test_parametric_map_is_on_the_grid_of_a_non_square_16_bit_source(xray16):
    assert (xray16.Rows, xray16.Columns, xray16.BitsAllocated) == (512, 640, 16)
    cam = cam28()
    values = map_to_source(cam, 640, 512)
    pm = build(xray16, values)
    assert (pm.Rows, pm.Columns, pm.NumberOfFrames) == (512, 640, 1)
    got = pm.pixel_array
    assert got.dtype == np.float32 and got.shape == (512, 640) and got.min() >= 0.0 and got.max() <= 1.0
    np.testing.assert_array_equal(got, values)
    # A few source pixels against bilinear interpolation by hand: the model's 28 x 28 grid
    # covers source columns 54.86 .. 566.86 and every row, 512 / 28 source pixels a model pixel.
    left, scale = 3 * 160 / 35 * 4, 512 / 28
    for y, x in [(0, 60), (100, 300), (255, 400), (511, 566), (300, 55)]:
        u, v = (x + 0.5 - left) / scale - 0.5, (y + 0.5) / scale - 0.5
        assert got[y, x] == pytest.approx(hand_bilinear(cam, u, v), abs=1e-6), (y, x)
    # Columns the centre crop cut away hold 0.
    assert not got[:, :54].any() and not got[:, 567:].any()


def test_parametric_map_of_a_model_sized_source_is_the_map_itself(dicom_file, pneumonia_npz):
    xray = np.load(pneumonia_npz)["test_images"][0].astype(np.uint16) * 16
    source = pydicom.dcmread(io.BytesIO(dicom_file(xray, "MONOCHROME2")))
    cam = cam28()
    pm = build(source, map_to_source(cam, 28, 28))
    assert (pm.Rows, pm.Columns) == (28, 28)
    np.testing.assert_allclose(pm.pixel_array, cam, atol=1e-7)


def test_codes_references_and_provenance(xray16):
    pm = build(xray16, map_to_source(cam28(), 640, 512))
    assert pm.SOPClassUID == pydicom.uid.ParametricMapStorage
    assert pm.StudyInstanceUID == xray16.StudyInstanceUID and pm.PatientID == xray16.PatientID
    assert pm.PatientName == xray16.PatientName
    assert pm.SeriesInstanceUID != xray16.SeriesInstanceUID
    assert "not for diagnostic use" in pm.SeriesDescription
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("130403", "DCM")
    assert quantity.CodeMeaning == "Gradient-weighted class activation"
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    assert (mapping.DoubleFloatRealWorldValueFirstValueMapped, mapping.DoubleFloatRealWorldValueLastValueMapped) == (
        0,
        1,
    )
    assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1, 0)
    ref = pm.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == xray16.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == xray16.SOPInstanceUID
    derivation = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert (
        derivation.ReferencedSOPInstanceUID == xray16.SOPInstanceUID and derivation.SpatialLocationsPreserved == "YES"
    )
    aex = [e for e in pm.ContributingEquipmentSequence if e.Manufacturer == "aex"]
    assert len(aex) == 1 and aex[0].ManufacturerModelName == "tiny-grey" and aex[0].SoftwareVersions.startswith("aex ")
    assert aex[0].DeviceUID == pm.DeviceUID == device_uid(SHA) != device_uid("0" * 64)
    # A projection image without a Frame of Reference gets a nominal one, in the map only.
    assert pm.FrameOfReferenceUID == geometry_source(xray16).FrameOfReferenceUID
    assert "FrameOfReferenceUID" not in xray16


def test_a_source_with_its_own_geometry_keeps_it(pydicom_file):
    ct = pydicom.dcmread(io.BytesIO(pydicom_file("CT_small.dcm")))
    copy = geometry_source(ct)
    for keyword in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        assert copy[keyword].value == ct[keyword].value, keyword
    pm = build(ct, map_to_source(cam28(), ct.Columns, ct.Rows))
    assert pm.FrameOfReferenceUID == ct.FrameOfReferenceUID
    plane = pm.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    assert [float(v) for v in plane.ImagePositionPatient] == [float(v) for v in ct.ImagePositionPatient]


def test_the_map_must_be_on_the_source_grid(xray16):
    with pytest.raises(ValueError, match="640 x 512"):
        build(xray16, np.zeros((28, 28), np.float32))


@pytest.mark.parametrize("name", ["xray16", "CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_dciodvfy_finds_no_error_in_the_parametric_map(tmp_path, xray16, pydicom_file, name):
    require_dciodvfy()
    source = xray16 if name == "xray16" else pydicom.dcmread(io.BytesIO(pydicom_file(name)))
    pm = build(source, map_to_source(cam28(), source.Columns, source.Rows))
    path = tmp_path / "pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_the_fused_maps_labels_say_not_for_diagnostic_use():
    """What OHIF shows of the fused map (the series' description in the study browser, the
    layer's content label and description) carries the warning, whole."""
    from tests.models.dicom.test_sr import derived
    from tests.support.dicom import xray

    pixels = (np.mgrid[0:64, 0:80].sum(0) * 40).clip(0, 4095).astype(np.uint16)
    source = pydicom.dcmread(io.BytesIO(xray(pixels)))
    (pm,) = [pydicom.dcmread(io.BytesIO(o.data)) for o in derived(source).objects if o.role == "gradcam_parametric_map"]
    assert pm.SeriesDescription.endswith("not for diagnostic use")
    assert pm.ContentDescription == "Grad-CAM of pneumonia, not for diagnostic use"
    assert pm.ContentLabel == "GRADCAM_NO_DIAG"
