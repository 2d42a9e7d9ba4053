import io

import numpy as np
import pytest
from PIL import Image

from models.data.imaging import (
    REDUCING_GAP,
    block_mean,
    image_to_array,
    match_channels,
    open_image,
    prepare_array,
    prepare_region,
    reduction_factor,
    resize_center,
    source_size,
)
from models.errors import (
    DecompressionBombError,
    ExtremeAspectRatioError,
    NonFinitePixelsError,
    UndecodableImageError,
    UnsupportedMediaError,
)
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


# --- Hostile input: every decoder failure a named error, bounded work, no garbage ---------


def _reference_resize_center(arr: np.ndarray, size: int) -> np.ndarray:
    """The resize as it was: the whole image scaled (shorter side to size), then cropped."""
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    chans = [np.asarray(Image.fromarray(arr[..., i]).resize((nw, nh), Image.BICUBIC)) for i in range(arr.shape[-1])]
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.clip(np.stack(chans, axis=-1)[top : top + size, left : left + size], 0.0, 1.0)


@pytest.mark.parametrize(
    "shape, size",
    [
        ((40, 48, 3), 32),
        ((28, 28, 1), 28),
        ((48, 40, 1), 28),
        ((100, 37, 3), 32),
        ((1, 30, 1), 32),
        ((127, 300, 3), 224),
    ],
)
def test_resize_center_equals_scaling_the_whole_image_then_cropping(shape, size):
    arr = np.random.default_rng(3).random(shape).astype(np.float32)
    np.testing.assert_allclose(resize_center(arr, size), _reference_resize_center(arr, size), atol=1e-5)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16", "F"])
@pytest.mark.parametrize("size, hw", [(32, (40, 48)), (28, (120, 127)), (32, (5, 100)), (28, (30, 1))])
def test_prepare_array_is_the_old_pipeline_for_ordinary_images(mode, size, hw):
    rng = np.random.default_rng(4)
    h, w = hw
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = {
        "RGB": lambda: Image.fromarray(rgb),
        "L": lambda: Image.fromarray(rgb[..., 0]),
        "RGBA": lambda: Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "P": lambda: Image.fromarray(rgb).convert("P"),
        "I;16": lambda: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "F": lambda: Image.fromarray(rgb[..., 0].astype(np.float32) * 3.5 - 100),
    }[mode]()
    for channels in (1, 3):
        expected = _reference_resize_center(match_channels(image_to_array(img), channels), size)
        np.testing.assert_allclose(prepare_array(img, size, channels), expected, atol=1e-5)


def test_large_images_are_block_averaged_first_and_read_by_region():
    yy, xx = np.mgrid[0:700, 0:900]
    arr = np.stack([xx / 900, yy / 700, (xx + yy) / 1600], axis=-1).astype(np.float32)
    img = Image.fromarray((arr * 255).astype(np.uint8))
    k = reduction_factor(900, 700, 32)
    assert k == 700 // (REDUCING_GAP * 32) == 5
    out = prepare_array(img, 32, 3)
    full = image_to_array(img)
    np.testing.assert_allclose(out, resize_center(block_mean(full, k), 32), atol=1e-5)  # same pixels, by region
    np.testing.assert_allclose(out, _reference_resize_center(full, 32), atol=0.01)  # close to the direct resize
    np.testing.assert_allclose(
        image_to_array(img, k, (100, 50, 603, 352)), block_mean(full[50:352, 100:603], k), atol=1e-6
    )

    boxes = []

    def read(box, k):
        boxes.append((box, k))
        return np.zeros((-(-(box[3] - box[1]) // k), -(-(box[2] - box[0]) // k), 1), np.float32)

    assert prepare_region(30000, 1500, read, 32, 1).shape == (32, 32, 1)
    (left, top, right, bottom), k = boxes[0]
    assert k == 11 and (bottom - top) == 1500 and (right - left) < 2000  # the centre square (and margin), not 30000


def test_thin_images_never_materialise_the_scaled_up_long_side():
    thin = Image.fromarray(np.linspace(0, 255, 20 * 1, dtype=np.uint8).reshape(1, 20))
    assert prepare_array(thin, 224, 1).shape == (224, 224, 1)


def test_jpeg_is_decoded_at_reduced_scale_when_a_size_is_given():
    big = _encode(Image.fromarray(np.full((1024, 1024, 3), 90, np.uint8)), "JPEG")
    img = open_image(big, draft=32)
    assert img.size == (128, 128) and source_size(img) == (1024, 1024)
    assert open_image(big).size == (1024, 1024) == source_size(open_image(big))
    assert open_image(_encode(Image.fromarray(np.zeros((40, 48, 3), np.uint8)), "PNG"), draft=32).size == (48, 40)


def test_any_decoder_exception_is_a_named_error_without_its_text(monkeypatch):
    jpeg = _encode(Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(UndecodableImageError, match="truncated or corrupt"):
        open_image(jpeg[:200])  # OSError from Image.open
    import models.data.imaging as imaging

    for exc in (KeyError("Doe^John"), struct_error("Doe^John"), RuntimeError("Doe^John"), IndexError("Doe^John")):
        monkeypatch.setattr(imaging.Image, "open", lambda *a, exc=exc, **k: (_ for _ in ()).throw(exc))
        with pytest.raises(UndecodableImageError) as info:
            open_image(jpeg)
        assert "Doe" not in info.value.message
    monkeypatch.undo()
    png = _encode(Image.fromarray(np.zeros((8, 8), np.uint8)), "PNG")
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(ValueError("Doe^John")))
    with pytest.raises(UndecodableImageError) as info:
        open_image(png)
    assert "Doe" not in info.value.message and "PNG" in info.value.message


def struct_error(text: str) -> Exception:
    import struct

    return struct.error(text)


def _png(extra: bytes, size: int = 8) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\x00" * (size * (size + 1)))
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_png_text_and_icc_chunks_that_inflate_too_far_are_bombs():
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    assert open_image(_png(chunk(b"tEXt", b"Comment\x00fine"))).size == (8, 8)
    with pytest.raises(DecompressionBombError, match="text or ICC"):
        open_image(_png(chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (2 << 20)))))
    with pytest.raises(DecompressionBombError, match="text or ICC"):
        open_image(_png(chunk(b"iCCP", b"ICC\x00\x00" + zlib.compress(b"\x00" * (2 << 20)))))


def test_non_finite_float_images_are_refused_with_counts():
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    values[0, 0], values[1, 1], values[2, 2], values[3, 3] = np.nan, np.inf, np.inf, -np.inf
    with pytest.raises(NonFinitePixelsError) as info:
        open_image(_encode(Image.fromarray(values), "TIFF"))
    assert "4 non-finite pixel values of 64" in info.value.message
    assert "1 NaN, 2 +inf, 1 -inf" in info.value.message
    fine = open_image(_encode(Image.fromarray(np.full((8, 8), 3e38, np.float32)), "TIFF"))
    assert np.isfinite(prepare_array(fine, 28, 1)).all()


def test_aspect_ratio_limit():
    def png(w, h):
        return _encode(Image.fromarray(np.zeros((h, w), np.uint8)), "PNG")

    assert open_image(png(20, 1)).size == (20, 1)
    assert open_image(png(1, 20)).size == (1, 20)
    for w, h in ((21, 1), (1, 21), (3000, 2)):
        with pytest.raises(ExtremeAspectRatioError, match="AEX_MAX_ASPECT_RATIO"):
            open_image(png(w, h))
    assert open_image(png(21, 1), max_aspect=None).size == (21, 1)
    assert open_image(png(21, 1), max_aspect=25).size == (21, 1)


def test_webp_may_have_a_quarter_of_the_pixels():
    webp = _encode(Image.fromarray(np.zeros((100, 100, 3), np.uint8)), "WEBP")
    assert open_image(webp, max_pixels=4 * 100 * 100).size == (100, 100)
    with pytest.raises(DecompressionBombError, match="AEX_MAX_IMAGE_PIXELS / 4"):
        open_image(webp, max_pixels=4 * 100 * 100 - 1)
