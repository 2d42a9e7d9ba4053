"""Image decoding and conversion with Pillow and NumPy only (no torch).

The service validates uploads with these functions without importing torch; workers and the
trainer use the same functions, so every path sees an image the same way.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.errors import DecompressionBombError, UndecodableImageError, UnsupportedMediaError

SUPPORTED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000; far beyond any classifier input


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` fully and return a loaded PIL image.

    Raises UnsupportedMediaError (not an image / unsupported format), DecompressionBombError
    (declared size over ``max_pixels``, checked from the header before any pixel is
    decoded) and UndecodableImageError (truncated or corrupt pixel data).
    """
    if not data:
        raise UnsupportedMediaError("the upload is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedMediaError(f"not a supported image; send one of {', '.join(SUPPORTED_FORMATS)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecompressionBombError("image dimensions are too large (decompression bomb?)") from None
    if img.format not in SUPPORTED_FORMATS:
        raise UnsupportedMediaError(
            f"image format {img.format} is not supported; send one of {', '.join(SUPPORTED_FORMATS)}"
        )
    w, h = img.size
    if w * h > max_pixels:
        raise DecompressionBombError(
            f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (decompression bomb?)"
        )
    if w < 1 or h < 1:
        raise UndecodableImageError("image has no pixels")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise UndecodableImageError(f"image data cannot be decoded ({exc}); truncated or corrupt file?") from None
    return img


def image_to_array(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to float32 H x W x C in [0, 1], C = 1 (grey) or 3 (colour).

    16-bit grey is scaled by 1/65535 (its full range), 32-bit int and float images by their
    own min-max; alpha is composited onto black; palette images are expanded.
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
        return arr[..., None]
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return arr[..., None]
    if mode in ("1", "L"):
        return (np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[..., None]
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        rgba = np.asarray(img, dtype=np.float32) / 255.0
        rgb = rgba[..., :3] * rgba[..., 3:4]
        # An image whose colour channels are all equal is grey: keep it one channel.
        return rgb[..., :1] if _is_grey(rgb) else rgb
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return rgb


def _is_grey(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def match_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """H x W x C float -> H x W x ``channels`` (grey replicated, or RGB to luma, ITU-R 601)."""
    c = arr.shape[-1]
    if c == channels:
        return arr
    if channels == 3 and c == 1:
        return np.repeat(arr, 3, axis=-1)
    if channels == 1 and c == 3:
        luma = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        return luma[..., None].astype(np.float32)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def resize_center(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop to size x size.

    arr: float32 H x W x C in [0, 1]; returns float32 size x size x C in [0, 1].
    """
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    chans = [
        np.asarray(Image.fromarray(arr[..., i], mode="F").resize((nw, nh), Image.BICUBIC)) for i in range(arr.shape[-1])
    ]
    out = np.stack(chans, axis=-1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.clip(out[top : top + size, left : left + size], 0.0, 1.0).astype(np.float32)


def prepare_array(img: Image.Image, input_size: int, in_channels: int) -> np.ndarray:
    """The one preprocessing path: PIL image -> float32 input_size x input_size x in_channels."""
    return resize_center(match_channels(image_to_array(img), in_channels), input_size)
