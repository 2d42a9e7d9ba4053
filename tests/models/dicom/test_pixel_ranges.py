"""DICOM pixels at the edges of their ranges through the real display pipeline
(``models.data.tensors.load_dicom_for_model`` on files written by ``tests.support.dicom.write_dicom``):
Rescale Slope/Intercept of +-1e308 and subnormal slopes give the network finite values in [0, 1]
in the order the modality values have (the image's own min-max, in float64), an image whose
values are all equal is 0 (1 when MONOCHROME1), a window as wide as float64 allows stays finite,
and modality values beyond float64 are refused as non_finite_pixels, counted."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from models.data.tensors import load_dicom_for_model
from models.dicom.pixels import window_linear
from models.errors import NonFinitePixelsError
from tests.support.dicom import write_dicom
from tests.support.edge_images import band_means, bands

UNSIGNED = bands((2, 0, 1), np.uint16)  # 24 x 24: the model's size, no resize
SIGNED = bands((2047, -2048, 0), np.int16)


def dicom(stored: np.ndarray, slope: float, intercept: float, window=None, photometric="MONOCHROME2") -> bytes:
    """``write_dicom``'s file, with signed 12-bit samples (Pixel Representation 1) for int16."""
    data = write_dicom(
        stored.astype(np.uint16) if stored.dtype != np.int16 else np.zeros(stored.shape),
        photometric,
        slope,
        intercept,
        window,
    )
    if stored.dtype != np.int16:
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelRepresentation, ds.PixelData = 1, stored.astype("<i2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# (name, stored, slope, intercept, window, what the network sees of each band)
EDGES = [
    # -1.6e308, 1.6e308 and 0 side by side: their span is over float64's largest (1.8e308)
    ("slope 8e304 on signed samples", SIGNED, 8e304, 0.0, None, (1.0, 0.0, 2048 / 4095)),
    ("slope -8e304 on signed samples", SIGNED, -8e304, 0.0, None, (0.0, 1.0, 2047 / 4095)),  # inverted
    ("slope 5e-324 (subnormal)", UNSIGNED, 5e-324, 0.0, None, (1.0, 0.0, 0.5)),
    ("slope 1e308, intercept -1e308", UNSIGNED[:, 8:], 1e308, -1e308, None, None),  # 0 and -1e308
    ("intercept -1.7e308", UNSIGNED, 1.0, -1.7e308, None, (0.0, 0.0, 0.0)),  # 2 - 1.7e308 rounds: all equal
    ("window as wide as float64", SIGNED, 8e304, 0.0, (0.0, 1.7e308), (1.0, 0.0, 0.5)),
    ("window far below the values", SIGNED, 8e304, 0.0, (-1.7e308, 2.0), (1.0, 1.0, 1.0)),
]


@pytest.mark.parametrize("name, stored, slope, intercept, window, seen", EDGES, ids=[e[0] for e in EDGES])
def test_extreme_rescale_and_window_reach_the_network_finite(name, stored, slope, intercept, window, seen):
    x, _ = load_dicom_for_model(dicom(stored, slope, intercept, window), 24, 1)
    assert bool(x.isfinite().all()) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    if seen is not None:
        np.testing.assert_allclose(band_means(x), seen, atol=1e-6)


@pytest.mark.parametrize("photometric, seen", [("MONOCHROME2", 0.0), ("MONOCHROME1", 1.0)])
def test_a_dicom_image_whose_values_are_all_equal_is_0_or_its_inverse(photometric, seen):
    data = write_dicom(np.full((24, 24), 100, np.uint16), photometric, 1e306, 0.0)
    x, _ = load_dicom_for_model(data, 24, 1)
    assert bool((x == seen).all())


def test_modality_values_beyond_float64_are_refused_counted():
    data = write_dicom(UNSIGNED, "MONOCHROME2", 1e308, 1e308)  # 1e308 x 2 and 1e308 + 1e308 overflow
    with pytest.raises(NonFinitePixelsError) as info:
        load_dicom_for_model(data, 24, 1)
    assert f"{24 * 16} of the {24 * 24}" in info.value.message and "0 NaN" in info.value.message


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_windows_of_extreme_values_are_never_nan(function):
    values = np.array([-1.7976931348623157e308, -1e308, 0.0, 1e308, 1.7976931348623157e308])
    for center, width in (
        (0.0, 1.7e308),
        (1.7e308, 1.0),
        (-1.7e308, 1.0),
        (0.0, 5e-324 if function != "LINEAR" else 1.0),
    ):
        with np.errstate(all="raise"):
            out = window_linear(values, center, width, function)
        assert np.isfinite(out).all() and (np.diff(out) >= 0).all(), (center, width, out)
