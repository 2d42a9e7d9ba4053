"""What a decoded image's pixels store where Pillow's mode does not say it: the TIFF sample types
its modes misread (unsigned 32-bit read as signed "I", signed 8-bit read as unsigned "L"), the
stored values exact in float64, their range, and which images are scaled by it. Pillow and
NumPy only, torch-free (``models.data.imaging`` uses these)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

SAMPLES = "aex_samples"  # img.info key: ``stored_samples``, set by ``imaging.open_image``


def stored_samples(img: Image.Image) -> str | None:
    """What a grey TIFF stores where Pillow's mode misreads it: "uint32" (unsigned 32-bit, read
    into the signed mode "I", so 2^31 and above wrap to negative), "int8" (signed 8-bit, read
    into "L" as if unsigned, so -1 reads 255); None for every other image."""
    if img.format != "TIFF" or img.mode not in ("I", "L"):
        return None
    tags = getattr(img, "tag_v2", {})

    def first(tag: int, default: int | None = None):
        value = tags.get(tag, default)
        return value[0] if isinstance(value, tuple) and value else value

    bits, kind = first(258), first(339, 1)  # BitsPerSample, SampleFormat (1 unsigned, 2 signed)
    if img.mode == "I" and bits == 32 and kind == 1:
        return "uint32"
    if img.mode == "L" and bits == 8 and kind == 2:
        return "int8"
    return None


def stored_values(strip: Image.Image, samples: str | None) -> np.ndarray:
    """The values an "I" or "F" image (or one of ``stored_samples``) stores, exact in float64."""
    if samples == "uint32":
        return np.asarray(strip, dtype=np.int32).view(np.uint32).astype(np.float64)
    if samples == "int8":
        return np.asarray(strip, dtype=np.uint8).view(np.int8).astype(np.float64)
    return np.asarray(strip, dtype=np.float64)


def scaled_by_range(img: Image.Image) -> bool:
    """Whether ``image_to_array`` scales an image by its own min-max (integer and float modes,
    and ``stored_samples``): the only images whose scaling depends on their values; any other
    is divided by its type's full range, so its network input is in [0, 1] by construction."""
    return img.mode in ("I", "F") or img.info.get(SAMPLES) is not None


def value_range(img: Image.Image, samples: str | None, strip_pixels: int) -> tuple[float, float]:
    """(min, max) of the stored values of the whole image (``stored_values``), read in strips
    of about ``strip_pixels`` pixels when Pillow's own extrema would misread them."""
    if samples is None:
        lo, hi = img.getextrema()
        return float(lo), float(hi)
    w, h = img.size
    rows = max(1, strip_pixels // w)
    lo, hi = math.inf, -math.inf
    for y in range(0, h, rows):
        values = stored_values(img.crop((0, y, w, min(h, y + rows))), samples)
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return lo, hi
