"""Images at the edges of their value ranges through the real decode path
(``models.data.tensors.load_image_for_model`` on files written to tmp_path): float32 TIFFs with
+-3.4e38 side by side, subnormals, all-equal values, int32, uint32, int16, int8 and 16-bit
extremes each give the network finite values in [0, 1] in the order the file stores them; the
sample types the decoder cannot read are a 415 naming them; and the network's input is checked
on every path (``check_model_input``: invalid_model_input when it is not finite or in range)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.data import imaging
from models.data.imaging import check_model_input, open_image, prepare_region
from models.data.tensors import load_image_for_model
from models.errors import ModelInputError, NonFinitePixelsError, UnsupportedMediaError
from tests.support.edge_images import F32_MAX, F32_TINY, band_means, bands, raw_tiff

# (name, the three band values left to right, dtype, what the network sees of each band)
EDGES = [
    ("float32 +-max", (F32_MAX, 0.0, -F32_MAX), np.float32, (1.0, 0.5, 0.0)),
    ("float32 +-3e38", (-3e38, 3e38, 0.0), np.float32, (0.0, 1.0, 0.5)),
    ("float32 subnormals", (F32_TINY, 0.0, -F32_TINY), np.float32, (1.0, 0.5, 0.0)),
    ("float32 max and a subnormal", (F32_MAX, F32_TINY, -F32_MAX), np.float32, (1.0, 0.5, 0.0)),
    ("int32 extremes", (2**31 - 1, -(2**31), 0), np.int32, (1.0, 0.0, 2**31 / (2**32 - 1))),
    ("uint32 extremes", (2**32 - 1, 0, 2**31), np.uint32, (1.0, 0.0, 2**31 / (2**32 - 1))),
    ("int16 extremes", (32767, -32768, 0), np.int16, (1.0, 0.0, 32768 / 65535)),
    ("uint16 extremes", (65535, 0, 32768), np.uint16, (1.0, 0.0, 32768 / 65535)),
    ("int8 extremes", (127, -128, 0), np.int8, (1.0, 0.0, 128 / 255)),
    ("uint8 extremes", (255, 0, 128), np.uint8, (1.0, 0.0, 128 / 255)),
]


@pytest.mark.parametrize("name, values, dtype, seen", EDGES, ids=[e[0] for e in EDGES])
def test_extreme_values_reach_the_network_finite_and_in_order(tmp_path, name, values, dtype, seen):
    path = tmp_path / "edge.tif"
    path.write_bytes(raw_tiff(bands(values, dtype)))  # 24 x 24: the model's size, no resize
    x = load_image_for_model(path, 24, 1)
    assert x.shape == (1, 24, 24) and bool(x.isfinite().all()) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    np.testing.assert_allclose(band_means(x), seen, atol=1e-6)


@pytest.mark.parametrize("name, values, dtype, seen", EDGES[:4], ids=[e[0] for e in EDGES[:4]])
def test_extreme_float_values_stay_finite_through_the_resize(tmp_path, name, values, dtype, seen):
    path = tmp_path / "edge.tif"
    path.write_bytes(raw_tiff(bands(values, dtype, height=200, width=120)))  # block-averaged, resized
    x = load_image_for_model(path, 32, 3)
    assert x.shape == (3, 32, 32) and bool(x.isfinite().all())
    assert float(x[:, :, :4].min()) == pytest.approx(seen[0], abs=1e-6)  # inside the first band
    assert float(x[:, :, -4:].max()) == pytest.approx(seen[2], abs=1e-6)  # inside the last


@pytest.mark.parametrize(
    "value, dtype", [(3.0e38, np.float32), (-F32_MAX, np.float32), (F32_TINY, np.float32), (-(2**31), np.int32)]
)
def test_an_image_whose_values_are_all_equal_is_all_0(tmp_path, value, dtype):
    path = tmp_path / "flat.tif"
    path.write_bytes(raw_tiff(np.full((30, 20), value, dtype=dtype)))
    x = load_image_for_model(path, 16, 1)
    assert bool((x == 0.0).all())


def test_a_16_bit_png_at_its_extremes(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(bands((65535, 0, 1), np.uint16)).save(buf, format="PNG")
    x = load_image_for_model(buf.getvalue(), 24, 1)
    np.testing.assert_allclose(band_means(x), (1.0, 0.0, 1 / 65535), atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64, np.uint64])
def test_sample_types_the_decoder_cannot_read_are_refused_naming_them(dtype):
    values = bands((1e308, -1e308, 0.0), np.float64) if dtype == np.float64 else bands((1, 0, 2), dtype)
    with pytest.raises(UnsupportedMediaError) as info:
        open_image(raw_tiff(values))
    assert info.value.code == "unsupported_media_type" and "TIFF whose samples" in info.value.message


def test_non_finite_float32_values_are_still_refused_as_pixels():
    values = bands((F32_MAX, np.inf, 0.0), np.float32)
    with pytest.raises(NonFinitePixelsError):
        open_image(raw_tiff(values))


@pytest.mark.parametrize(
    "bad, counted",
    [
        (np.nan, "1 values that are not finite (1 NaN, 0 +inf, 0 -inf) and 0 outside"),
        (-np.inf, "1 values that are not finite (0 NaN, 0 +inf, 1 -inf) and 0 outside"),
        (1.5, "0 values that are not finite (0 NaN, 0 +inf, 0 -inf) and 1 outside [0, 1]"),
        (-1e-3, "0 values that are not finite (0 NaN, 0 +inf, 0 -inf) and 1 outside [0, 1]"),
    ],
)
def test_the_network_input_is_checked_finite_and_in_range(bad, counted):
    arr = np.full((8, 8, 1), 0.5, dtype=np.float32)
    assert check_model_input(arr) is arr
    arr[3, 4, 0] = bad
    with pytest.raises(ModelInputError) as info:
        check_model_input(arr)
    assert info.value.code == "invalid_model_input" and counted in info.value.message


@pytest.mark.parametrize("size", [8, 4])  # the same size (no resize) and a resize
def test_every_preprocessing_path_ends_in_the_check(size):
    def read(box, k):  # a source whose scaling went wrong: a NaN in the middle
        arr = np.full(((box[3] - box[1] + k - 1) // k, (box[2] - box[0] + k - 1) // k, 1), 0.5, dtype=np.float32)
        arr[arr.shape[0] // 2, arr.shape[1] // 2] = np.nan
        return arr

    with pytest.raises(ModelInputError):
        prepare_region(8, 8, read, size, 1)


def test_the_float32_scaling_this_replaced_would_be_caught_at_the_network_input(tmp_path, monkeypatch):
    # The old scaling, in float32: (3.4e38 - -3.4e38) overflows, and 0/0 and inf/inf are NaN.
    def float32_scaling(values, lo, hi):
        values = np.asarray(values, dtype=np.float32)
        with np.errstate(all="ignore"):
            return (values - np.float32(lo)) / (np.float32(hi) - np.float32(lo))

    monkeypatch.setattr(imaging, "unit_range", float32_scaling)
    path = tmp_path / "edge.tif"
    path.write_bytes(raw_tiff(bands((F32_MAX, 0.0, -F32_MAX), np.float32)))
    with pytest.raises(ModelInputError):
        load_image_for_model(path, 24, 1)
