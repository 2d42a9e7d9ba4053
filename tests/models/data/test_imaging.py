import io

import numpy as np
import pytest
from PIL import Image

from models.data.imaging import image_to_array, open_image, prepare_array, resize_center
from models.errors import DecompressionBombError, UndecodableImageError, UnsupportedMediaError
from models.render.png import to_png_bytes


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP", "WEBP"])
def test_every_supported_format_decodes(fmt):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    arr = image_to_array(open_image(_encode(rgb, fmt)))
    assert arr.shape == (20, 30, 3) and arr.dtype == np.float32
    assert arr.min() >= 0.0 and arr.max() <= 1.0


def test_modes_grey_rgba_palette_16bit():
    grey = Image.fromarray(np.full((8, 8), 128, np.uint8), mode="L")
    assert image_to_array(open_image(_encode(grey, "PNG"))).shape == (8, 8, 1)

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128  # half transparent over black
    arr = image_to_array(open_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert arr.shape == (8, 8, 3)
    assert arr[0, 0, 0] == pytest.approx(200 / 255 * 128 / 255, abs=1e-6)

    pal = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 4, mode="L").convert("P")
    assert image_to_array(open_image(_encode(pal, "PNG"))).shape[-1] in (1, 3)

    sixteen = Image.fromarray(np.full((8, 8), 65535 // 2, np.uint16))
    arr = image_to_array(open_image(_encode(sixteen, "PNG")))
    assert arr.shape == (8, 8, 1)
    assert arr[0, 0, 0] == pytest.approx((65535 // 2) / 65535, abs=1e-6)


def test_bad_inputs_raise_named_errors():
    with pytest.raises(UnsupportedMediaError):
        open_image(b"")
    with pytest.raises(UnsupportedMediaError):
        open_image(b"this is plain text, not an image")
    png = _encode(Image.fromarray(np.zeros((64, 64, 3), np.uint8)), "PNG")
    with pytest.raises(UndecodableImageError):
        open_image(png[: len(png) // 2])
    with pytest.raises(DecompressionBombError):
        open_image(png, max_pixels=1000)


def test_prepare_array_resizes_and_converts_channels():
    rgb = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    out = prepare_array(Image.fromarray(rgb), 28, 1)
    assert out.shape == (28, 28, 1)
    same = resize_center(np.ones((32, 32, 3), np.float32), 32)
    assert same.shape == (32, 32, 3)


def test_png_round_trip():
    arr = np.random.default_rng(2).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(to_png_bytes(arr))))
    assert np.array_equal(arr, back)
