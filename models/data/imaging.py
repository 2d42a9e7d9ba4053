"""Image decoding and conversion with Pillow and NumPy only (no torch).

The service validates uploads with these functions without importing torch; workers and the
trainer use the same functions, so every path sees an image the same way. Every failure of a
decoder, whatever its exception class, leaves as one of the catalogue's errors with a fixed
message (never the decoder's text, which may quote the file).

Memory, for an accepted upload of ``max_pixels`` pixels at most (AEX_MAX_IMAGE_PIXELS,
default 50 megapixels): the decoded image in Pillow's own layout (at most 4 bytes a pixel:
200 MB at the default limit; a JPEG is decoded at 1/2, 1/4 or 1/8 scale when the caller
needs less; a WebP, whose decoder holds four copies, may have a quarter of the pixels), plus
float strips of at most ``STRIP_PIXELS`` source pixels (float64 for integer and float images,
whose scaling runs in float64: ``models.scaling``), plus the float32
array the model's input is resized from: the centre square of the image block-averaged by an
integer factor so that its shorter side stays under ``2 x REDUCING_GAP x input_size``
(so a few MB, whatever the upload). The resize never materialises the scaled-up long side.
What comes out, the network's input, is checked (``check_model_input``): finite and in [0, 1].
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.data.samples import SAMPLES, scaled_by_range, stored_samples, stored_values, value_range
from models.errors import (
    DecompressionBombError,
    ExtremeAspectRatioError,
    ModelInputError,
    NonFinitePixelsError,
    UndecodableImageError,
    UnsupportedMediaError,
)
from models.scaling import non_finite_counts, unit_range

SUPPORTED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000; far beyond any classifier input
DEFAULT_MAX_ASPECT = 20  # longer side / shorter side; a panoramic dental X-ray is about 2.5
# An image is block-averaged by an integer factor k only while its shorter side stays at least
# REDUCING_GAP x the model's input (Pillow's reducing_gap): the bicubic resize then does the rest.
REDUCING_GAP = 4
STRIP_PIXELS = 1 << 20  # source pixels converted to float at a time
SOURCE_SIZE = "aex_source_size"  # img.info key: (width, height) as uploaded, before draft scaling
# Formats whose decoder holds more than Pillow's image: libwebp's animation decoder (Pillow's
# only WebP decoder) keeps two RGBA canvases and hands over a copy of one, so a WebP may have
# a quarter of the pixels.
PIXEL_COST = {"WEBP": 4}
BICUBIC_SUPPORT = 2.0


def check_geometry(
    width: int, height: int, max_pixels: int | None, max_aspect: float | None, what: str, cost: int = 1
) -> None:
    """DecompressionBombError over ``max_pixels`` / ``cost``, ExtremeAspectRatioError over
    ``max_aspect``, UndecodableImageError for an image without pixels (``what`` names it)."""
    if width < 1 or height < 1:
        raise UndecodableImageError(f"{what} has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels // cost:
        limit = "AEX_MAX_IMAGE_PIXELS" if cost == 1 else f"AEX_MAX_IMAGE_PIXELS / {cost} for this format"
        raise DecompressionBombError(
            f"{what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels // cost} "
            f"({limit}; decompression bomb?)"
        )
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise ExtremeAspectRatioError(
            f"{what} is {width}x{height}: its longer side is over {max_aspect:g} times its shorter side "
            "(AEX_MAX_ASPECT_RATIO); crop it to the region to classify"
        )


def open_image(
    data: bytes,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
    draft: int | None = None,
) -> Image.Image:
    """Decode ``data`` fully and return a loaded PIL image.

    Raises UnsupportedMediaError (not an image / unsupported format), DecompressionBombError
    (declared size over ``max_pixels``, checked from the header before any pixel is decoded;
    or a PNG text or ICC chunk that inflates past Pillow's limit), ExtremeAspectRatioError
    (longer side over ``max_aspect`` x the shorter), UndecodableImageError (truncated or
    corrupt data) and NonFinitePixelsError (a float image holding NaN or infinity).

    ``draft``: the side the caller will resize to; a JPEG is then decoded at the smallest DCT
    scale (1/2, 1/4, 1/8) that keeps both sides at least REDUCING_GAP x ``draft`` (every byte
    is still decoded, so a corrupt file is still refused). ``img.info[SOURCE_SIZE]`` keeps the
    size as uploaded.
    """
    if not data:
        raise UnsupportedMediaError("the upload is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings about corrupt metadata
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        if data[:4] in (b"II*\x00", b"MM\x00*"):  # a TIFF, with samples Pillow has no mode for
            raise UnsupportedMediaError(
                "a TIFF whose samples cannot be read here (64-bit or 16-bit float, 64-bit integer, or another "
                "layout); send 8- or 16-bit, 32-bit integer or 32-bit float samples"
            ) from None
        raise UnsupportedMediaError(f"not a supported image; send one of {', '.join(SUPPORTED_FORMATS)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecompressionBombError("image dimensions are too large (decompression bomb?)") from None
    except ValueError as exc:
        if "too large" in str(exc) or "Too much memory" in str(exc):
            raise DecompressionBombError(
                "a PNG text or ICC profile chunk inflates past Pillow's limit (decompression bomb?)"
            ) from None
        raise UndecodableImageError("the image header cannot be read (truncated or corrupt file)") from None
    except Exception:  # any other decoder failure (OSError, SyntaxError, struct.error, ...)
        raise UndecodableImageError("the image header cannot be read (truncated or corrupt file)") from None
    w, h = img.size
    check_geometry(w, h, max_pixels, max_aspect, f"{img.format} image", PIXEL_COST.get(img.format, 1))
    img.info[SOURCE_SIZE] = (w, h)
    if draft is not None and img.format == "JPEG":
        side = max(1, REDUCING_GAP * draft)
        img.draft(img.mode, (side, side))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception:
        raise UndecodableImageError(
            f"the {img.format} image data cannot be decoded (truncated or corrupt file)"
        ) from None
    if img.mode == "F":
        check_finite_image(img)
    img.info[SAMPLES] = stored_samples(img)
    return img


def source_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as uploaded (before any draft scaling)."""
    return tuple(img.info.get(SOURCE_SIZE, img.size))


def check_finite_image(img: Image.Image) -> None:
    """NonFinitePixelsError when a float image holds NaN or infinity (counted in strips)."""
    w, h = img.size
    rows = max(1, STRIP_PIXELS // w)
    nan = pinf = ninf = 0
    for y in range(0, h, rows):
        a, b, c = non_finite_counts(np.asarray(img.crop((0, y, w, min(h, y + rows))), dtype=np.float32))
        nan, pinf, ninf = nan + a, pinf + b, ninf + c
    if nan or pinf or ninf:
        raise NonFinitePixelsError(
            f"the image holds {nan + pinf + ninf} non-finite pixel values of {w * h} "
            f"({nan} NaN, {pinf} +inf, {ninf} -inf); send finite values"
        )


def check_model_input(arr: np.ndarray) -> np.ndarray:
    """``arr`` (float H x W x C, the network's input) when every value is finite and in
    [0, 1]; ModelInputError counting the others. The last step of every preprocessing path:
    what goes into the network is checked, not only what came in."""
    # Almost always in range: two reductions say so (a NaN makes both comparisons false);
    # the counts, seven passes, only for the message.
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        return arr
    nan, pinf, ninf = non_finite_counts(arr)
    with np.errstate(invalid="ignore"):
        outside = int((np.isfinite(arr) & ((arr < 0.0) | (arr > 1.0))).sum())
    if nan or pinf or ninf or outside:
        h, w, c = arr.shape
        raise ModelInputError(
            f"the image as the network would see it ({h} x {w} x {c}, scaled to [0, 1]) holds {nan + pinf + ninf} "
            f"values that are not finite ({nan} NaN, {pinf} +inf, {ninf} -inf) and {outside} outside [0, 1]; "
            "nothing was computed from it"
        )
    return arr


def block_mean(arr: np.ndarray, k: int) -> np.ndarray:
    """H x W x C float -> ceil(H/k) x ceil(W/k) x C: the mean of each k x k block (partial
    blocks at the bottom and right edges averaged over the pixels they have)."""
    if k == 1:
        return arr.astype(np.float32, copy=False)
    h, w = arr.shape[:2]
    ys, xs = np.arange(0, h, k), np.arange(0, w, k)
    sums = np.add.reduceat(np.add.reduceat(arr.astype(np.float64, copy=False), ys, axis=0), xs, axis=1)
    counts = np.minimum(k, h - ys)[:, None, None] * np.minimum(k, w - xs)[None, :, None]
    return (sums / counts).astype(np.float32)


def strip_rows(width: int, k: int) -> int:
    """Rows of a strip (a multiple of ``k``) holding about STRIP_PIXELS pixels of ``width``."""
    return max(k, (STRIP_PIXELS // max(1, width)) // k * k)


def gather(strips: Iterable[np.ndarray], k: int) -> np.ndarray:
    """Block-average each strip (rows a multiple of ``k``, but the last) and stack them."""
    return np.concatenate([block_mean(s, k) for s in strips], axis=0)


def _strip_to_float(strip: Image.Image, lo: float, hi: float, samples: str | None) -> tuple[np.ndarray, bool]:
    """One strip of a PIL image as float32 H x W x C in [0, 1]; True when it went through RGBA.
    ``lo``, ``hi``: the image's ``value_range`` (integer and float images)."""
    mode = strip.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return (np.asarray(strip, dtype=np.uint16).astype(np.float32) / 65535.0)[..., None], False
    if mode in ("I", "F") or samples is not None:
        # float64 until the values are in [0, 1]: a float32 image's (x - lo) may be over 3.4e38
        return unit_range(stored_values(strip, samples), lo, hi).astype(np.float32)[..., None], False
    if mode in ("1", "L"):
        return (np.asarray(strip.convert("L"), dtype=np.float32) / 255.0)[..., None], False
    if mode in ("P", "LA", "PA", "RGBA"):
        rgba = np.asarray(strip if mode == "RGBA" else strip.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3] * rgba[..., 3:4], True
    return np.asarray(strip.convert("RGB"), dtype=np.float32) / 255.0, False


def image_to_array(img: Image.Image, factor: int = 1, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Convert any PIL mode to float32 H x W x C in [0, 1], C = 1 (grey) or 3 (colour).

    16-bit grey is scaled by 1/65535 (its full range); signed, 32-bit int and float images by
    the min-max of the whole image, in float64 (``models.scaling.unit_range``: an image whose
    values are all equal is all 0); alpha is composited onto black; palette images are expanded.
    ``box`` (left, top, right, bottom): only that region; ``factor``: block-averaged over
    factor x factor pixels (``block_mean``). Converted in strips of about STRIP_PIXELS.
    """
    w, h = img.size
    left, top, right, bottom = box or (0, 0, w, h)
    lo = hi = 0.0
    samples = img.info.get(SAMPLES)
    if scaled_by_range(img):
        lo, hi = value_range(img, samples, STRIP_PIXELS)
    rows = strip_rows(right - left, factor)
    whole = (left, top, right, bottom) == (0, 0, w, h) and rows >= h
    parts, through_rgba = [], False
    for y in range(top, bottom, rows):
        strip = img if whole else img.crop((left, y, right, min(bottom, y + rows)))
        arr, through_rgba = _strip_to_float(strip, lo, hi, samples)
        parts.append(block_mean(arr, factor))
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    # An image whose colour channels are all equal is grey: keep it one channel.
    return out[..., :1] if through_rgba and _is_grey(out) else out


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


def centre_box(h: int, w: int, size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom), in source pixels, of what "resize the shorter side to
    ``size``, then centre-crop size x size" keeps."""
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    return left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh


def _resize_box(arr: np.ndarray, size: int, box: tuple[float, float, float, float]) -> np.ndarray:
    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(arr[..., i], dtype=np.float32)).resize(
                (size, size), Image.BICUBIC, box=box
            )
        )
        for i in range(arr.shape[-1])
    ]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0).astype(np.float32)


def resize_center(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop to size x size.

    arr: float32 H x W x C in [0, 1]; returns float32 size x size x C in [0, 1]. Only the
    kept region is resampled (Pillow's resize ``box``; the filter still reads the pixels
    around it), so the scaled-up long side of a thin image is never materialised.
    """
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    return _resize_box(arr, size, centre_box(h, w, size))


def reduction_factor(width: int, height: int, size: int) -> int:
    """The integer factor an image may be block-averaged by before its resize to ``size``:
    its shorter side stays at least REDUCING_GAP x ``size``."""
    return max(1, min(width, height) // (REDUCING_GAP * size))


def model_view(width: int, height: int, input_size: int) -> tuple[int, tuple[float, float, float, float]]:
    """(k, box): the factor a ``width`` x ``height`` source is block-averaged by before its
    resize, and the region (left, top, right, bottom) of the block-averaged image (ceil(width /
    k) x ceil(height / k) pixels) that the model's input_size x input_size input is resampled
    from: its centre square, or all of it when it is already that size. ``prepare_region``
    runs this geometry; ``models.data.geometry`` inverts it."""
    k = reduction_factor(width, height, input_size)
    hr, wr = -(-height // k), -(-width // k)
    if (hr, wr) == (input_size, input_size):
        return k, (0.0, 0.0, float(wr), float(hr))
    return k, centre_box(hr, wr, input_size)


# read(box, k): the region box = (left, top, right, bottom) of the source, in source pixels
# (multiples of k but at the image's edges), as float32 H x W x C block-averaged by k.
RegionReader = Callable[[tuple[int, int, int, int], int], np.ndarray]
# strips(box, rows): the region box of the source as float H x W x C strips of ``rows`` rows.
StripReader = Callable[[tuple[int, int, int, int], int], Iterable[np.ndarray]]


def prepare_region(width: int, height: int, read: RegionReader, input_size: int, in_channels: int) -> np.ndarray:
    """The one preprocessing path, for any source of ``width`` x ``height`` pixels that can
    be read by region: float32 input_size x input_size x in_channels. The same pixels as
    "to float, block-average by ``reduction_factor``, match channels, ``resize_center``",
    reading only the centre region that the bicubic filter touches; checked before it is
    returned (``check_model_input``)."""
    k, box = model_view(width, height, input_size)
    hr, wr = -(-height // k), -(-width // k)
    if (hr, wr) == (input_size, input_size):
        return check_model_input(match_channels(read((0, 0, width, height), k), in_channels))
    margin = math.ceil(BICUBIC_SUPPORT * max(1.0, (box[2] - box[0]) / input_size)) + 2
    x0, y0 = max(0, math.floor(box[0]) - margin), max(0, math.floor(box[1]) - margin)
    x1, y1 = min(wr, math.ceil(box[2]) + margin), min(hr, math.ceil(box[3]) + margin)
    arr = match_channels(read((x0 * k, y0 * k, min(width, x1 * k), min(height, y1 * k)), k), in_channels)
    return check_model_input(_resize_box(arr, input_size, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)))


def prepare_strips(width: int, height: int, strips: StripReader, input_size: int, in_channels: int) -> np.ndarray:
    """``prepare_region`` of a source read in strips (a DICOM image's display pipeline:
    ``DicomImage.strips``), each block-averaged as it comes."""

    def read(box: tuple[int, int, int, int], k: int) -> np.ndarray:
        return gather(strips(box, strip_rows(box[2] - box[0], k)), k)

    return prepare_region(width, height, read, input_size, in_channels)


def prepare_array(img: Image.Image, input_size: int, in_channels: int) -> np.ndarray:
    """The one preprocessing path: PIL image -> float32 input_size x input_size x in_channels."""
    w, h = img.size
    return prepare_region(w, h, lambda box, k: image_to_array(img, k, box), input_size, in_channels)
