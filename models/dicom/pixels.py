"""DICOM input: turn one single-frame DICOM image into the pixels a model sees.

The display pipeline of PS3.3 C.11, in order: Modality LUT (Rescale Slope/Intercept or a
Modality LUT Sequence), VOI LUT (Window Center/Width with its VOI LUT Function, a VOI LUT
Sequence, or a caller's window override), then Presentation: MONOCHROME1 is inverted so that
bright always means dense. Colour images (RGB, YBR_* converted by pydicom, PALETTE COLOR)
are scaled by their stored bit depth. Pydicom and NumPy only: the service imports this
without torch.

The file is read and its Image Pixel module checked by ``models.dicom.reading`` (the same
function for the API's admission check and the worker). Every attribute the pipeline uses is
read through ``reading.attribute`` and checked before it is used, so a missing lookup table,
a window or rescale value that is not a number, or a LUT without its descriptor is
InvalidDicomError (422) naming the attribute, never its value. Values that come out NaN or
infinite after the Modality LUT (a slope or intercept that is not finite, or finite ones whose
product overflows float64) are NonFinitePixelsError (422), counted. Every
scaling after it runs in float64 (``models.scaling``): a window or the image's min-max of finite
values is always finite, whatever their magnitude, and an image whose values are all equal is 0.

Memory: the decoded pixel array (at most 2 bytes x the pixel limit, ``reading``), plus float64
strips of about STRIP_PIXELS pixels: ``dicom_to_pixels`` checks every pixel strip by strip,
and the display pixels are computed strip by strip for the region a caller reads
(``DicomImage.strips``); the full-resolution float image exists only when asked for
(``DicomImage.pixels``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from models.dicom.reading import (
    Geometry,
    attribute,
    check_pixel_length,
    first_number,
    image_geometry,
    is_dicom,
    read_dicom,
    transfer_syntax,
    whole,
)
from models.errors import AexError, BadParameterError, InvalidDicomError, NonFinitePixelsError, UnsupportedMediaError
from models.scaling import non_finite_counts, unit_range

__all__ = ["DicomImage", "dicom_to_pixels", "is_dicom", "load_dicom_pixels", "read_dicom", "window_linear"]

STRIP_PIXELS = 1 << 20

# raw rows (h x w, or h x w x 3) -> float64 h x w x C display values in [0, 1]
Display = Callable[[np.ndarray], np.ndarray]


@dataclass
class DicomImage:
    """A decoded DICOM image and its display pipeline: ``strips`` or ``pixels`` give float32
    H x W x C in [0, 1] (C = 1 or 3); dataset: the parsed source."""

    dataset: pydicom.Dataset
    window: tuple[float, float] | None  # (center, width) actually applied, if any
    raw: np.ndarray  # the stored values, rows x columns (x 3)
    display: Display
    channels: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) = (Columns, Rows)."""
        return int(self.raw.shape[1]), int(self.raw.shape[0])

    def strips(self, box: tuple[int, int, int, int] | None = None, rows: int | None = None) -> Iterator[np.ndarray]:
        """The display pixels of ``box`` (left, top, right, bottom; the whole image by
        default), ``rows`` rows at a time (about STRIP_PIXELS pixels by default)."""
        w, h = self.size
        left, top, right, bottom = box or (0, 0, w, h)
        rows = rows or max(1, STRIP_PIXELS // max(1, right - left))
        for y in range(top, bottom, rows):
            yield self.display(self.raw[y : min(bottom, y + rows), left:right]).astype(np.float32)

    @property
    def pixels(self) -> np.ndarray:
        """The whole image at full resolution: float32 H x W x C in [0, 1]."""
        return np.concatenate(list(self.strips()), axis=0)


def window_linear(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2, mapped to [0, 1] (float64 in, float64 out).

    Finite values, center and width never give NaN: a difference that overflows float64 is
    +-inf with the sign of the true one, and lands on the window's end it is beyond (0 or 1)."""
    x = values.astype(np.float64)
    function = (function or "LINEAR").upper()
    with np.errstate(over="ignore", under="ignore"):
        if function == "SIGMOID":
            if width <= 0:
                raise BadParameterError("window width must be > 0 for SIGMOID")
            return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        if function == "LINEAR_EXACT":
            if width <= 0:
                raise BadParameterError("window width must be > 0 for LINEAR_EXACT")
            return np.clip((x - center) / width + 0.5, 0.0, 1.0)
        if width < 1:
            raise BadParameterError("window width must be >= 1 for a LINEAR VOI window")
        if width == 1:
            return (x > center - 0.5).astype(np.float64)
        y = ((x - (center - 0.5)) / (width - 1)) + 0.5
        return np.clip(y, 0.0, 1.0)


def _row_strips(raw: np.ndarray) -> Iterator[np.ndarray]:
    rows = max(1, STRIP_PIXELS // max(1, raw.shape[1]))
    for y in range(0, raw.shape[0], rows):
        yield raw[y : y + rows]


def _guarded(fn: Callable[..., np.ndarray], message: str) -> Callable[..., np.ndarray]:
    """``fn`` whose failures (pydicom's, NumPy's) are InvalidDicomError(``message``)."""

    def call(*args):
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn(*args)
        except AexError:
            raise
        except Exception:
            raise InvalidDicomError(message) from None

    return call


def _decode(ds: pydicom.Dataset, geometry: Geometry) -> np.ndarray:
    ts = transfer_syntax(ds)
    try:
        encapsulated = ts is not None and ts.is_transfer_syntax and ts.is_encapsulated
        name = ts.name if ts is not None and ts.is_transfer_syntax else "an unknown transfer syntax"
    except Exception:
        encapsulated, name = False, "an unknown transfer syntax"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            raw = ds.pixel_array
    except Exception:
        if encapsulated:
            raise UnsupportedMediaError(
                f"compressed transfer syntax {name} cannot be decoded here (no decoder for it, or corrupt data)"
            ) from None
        if ts is None or name == "an unknown transfer syntax":
            raise UnsupportedMediaError(
                "the file's transfer syntax is missing or unknown; its pixels cannot be decoded"
            ) from None
        raise InvalidDicomError(
            f"DICOM attribute {geometry.keyword} cannot be decoded as the Image Pixel module describes it"
        ) from None
    expected = (geometry.rows, geometry.columns) + ((3,) if geometry.samples == 3 else ())
    if raw.shape != expected:
        raise InvalidDicomError(
            f"DICOM attribute {geometry.keyword} decodes to {raw.shape}, not Rows x Columns"
            + (" x 3" if geometry.samples == 3 else "")
        )
    return raw


def _lut_item(ds: pydicom.Dataset, sequence: str) -> pydicom.Dataset:
    """The first item of a LUT sequence, with a usable LUTDescriptor and LUTData."""
    items = attribute(ds, sequence, list, [], "a sequence")
    if not items:
        raise InvalidDicomError(f"DICOM attribute {sequence} has no item")
    item = items[0]
    descriptor = attribute(item, "LUTDescriptor", lambda v: [int(x) for x in v], None, "three integers")
    if descriptor is None or len(descriptor) != 3:
        raise InvalidDicomError(f"DICOM attribute LUTDescriptor of {sequence} is missing or not three integers")
    if not 1 <= descriptor[2] <= 16:
        raise InvalidDicomError(f"DICOM attribute LUTDescriptor of {sequence} gives a bit depth outside 1 to 16")
    if not attribute(item, "LUTData", len, 0, "lookup table data"):
        raise InvalidDicomError(f"DICOM attribute LUTData of {sequence} is missing")
    return item


def _modality(ds: pydicom.Dataset) -> Display:
    """Stored values -> modality values (float64): the Modality LUT Sequence, or Rescale
    Slope/Intercept (both present), or the values as they are."""
    if "ModalityLUTSequence" in ds:
        _lut_item(ds, "ModalityLUTSequence")
        return _guarded(
            lambda raw: apply_modality_lut(raw, ds).astype(np.float64),
            "the Modality LUT (DICOM attribute ModalityLUTSequence) cannot be applied",
        )
    slope = attribute(ds, "RescaleSlope", first_number, None, "a number")
    intercept = attribute(ds, "RescaleIntercept", first_number, None, "a number")
    if slope is None or intercept is None:
        return lambda raw: raw.astype(np.float64)

    def rescale(raw: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            values = raw.astype(np.float64) * slope
            values += intercept
        return values

    return rescale


def _check_window(center: float, width: float, function: str, error: type[AexError], names: tuple[str, str]) -> None:
    for name, value in zip(names, (center, width)):
        if not math.isfinite(value):
            raise error(f"{name} is not a finite number")
    exact = function in ("SIGMOID", "LINEAR_EXACT")
    if (width <= 0) if exact else (width < 1):
        raise error(f"{names[1]} must be {'> 0' if exact else '>= 1'} for a {function} VOI window")


# (raw strip, modality values of the strip) -> float64 values in [0, 1]
Voi = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _voi(
    ds: pydicom.Dataset, window: tuple[float, float] | None
) -> tuple[Voi | None, tuple[float, float] | None, bool]:
    """(the VOI transform or None for the image's own min-max, the window applied, whether it
    is a lookup table to try on every strip)."""
    function = attribute(ds, "VOILUTFunction", lambda v: str(v).strip().upper(), "LINEAR")
    if window is not None:
        center, width = float(window[0]), float(window[1])
        _check_window(center, width, function, BadParameterError, ("window_center", "window_width"))
        return (lambda _raw, values: window_linear(values, center, width, function)), (center, width), False
    center = attribute(ds, "WindowCenter", first_number, None, "a number")
    width = attribute(ds, "WindowWidth", first_number, None, "a number")
    if center is not None and width is not None:
        _check_window(
            center, width, function, InvalidDicomError, ("DICOM attribute WindowCenter", "DICOM attribute WindowWidth")
        )
        return (lambda _raw, values: window_linear(values, center, width, function)), (center, width), False
    if "VOILUTSequence" in ds:
        bits = int(_lut_item(ds, "VOILUTSequence").LUTDescriptor[2])
        use_raw = "ModalityLUTSequence" in ds
        lut = _guarded(
            lambda raw, values: apply_voi_lut(raw if use_raw else values, ds, index=0).astype(np.float64),
            "the VOI LUT (DICOM attribute VOILUTSequence) cannot be applied",
        )
        return (lambda raw, values: lut(raw, values) / (2**bits - 1)), None, True
    return None, None, False


def _grey(ds: pydicom.Dataset, raw: np.ndarray, window, photometric: str) -> DicomImage:
    modality = _modality(ds)
    voi, applied, try_lut = _voi(ds, window)
    nan = pinf = ninf = 0
    lo, hi = math.inf, -math.inf
    for strip in _row_strips(raw):  # every pixel checked, whatever region is read later
        values = modality(strip)
        counts = non_finite_counts(values)
        nan, pinf, ninf = nan + counts[0], pinf + counts[1], ninf + counts[2]
        if voi is None and values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        elif try_lut:
            voi(strip, values)
    if nan or pinf or ninf:
        raise NonFinitePixelsError(
            f"{nan + pinf + ninf} of the {raw.size} DICOM pixel values are not finite after the Modality LUT "
            f"(RescaleSlope, RescaleIntercept or ModalityLUTSequence): {nan} NaN, {pinf} +inf, {ninf} -inf"
        )
    invert = photometric == "MONOCHROME1"

    def display(strip: np.ndarray) -> np.ndarray:
        values = modality(strip)
        if voi is not None:
            out = voi(strip, values)
        else:  # the image's own range, in float64 (all 0 when every value is equal)
            out = unit_range(values, lo, hi)
        if invert:
            out = 1.0 - out
        return np.clip(out, 0.0, 1.0)[..., None]

    return DicomImage(ds, applied, raw, display, 1)


def _palette(ds: pydicom.Dataset, raw: np.ndarray) -> DicomImage:
    for colour in ("Red", "Green", "Blue"):
        descriptor = f"{colour}PaletteColorLookupTableDescriptor"
        if attribute(ds, descriptor, lambda v: [int(x) for x in v], None, "three integers") is None:
            raise InvalidDicomError(f"PALETTE COLOR image without DICOM attribute {descriptor}")
        data = f"{colour}PaletteColorLookupTableData"
        if data not in ds and f"Segmented{data}" not in ds:
            raise InvalidDicomError(f"PALETTE COLOR image without DICOM attribute {data}")
    lut = _guarded(
        lambda strip: apply_color_lut(strip, ds),
        "the Palette Color Lookup Table (DICOM attributes *PaletteColorLookupTableDescriptor and *Data) cannot be applied",
    )
    top = max(int(lut(strip).max()) for strip in _row_strips(raw))
    scale = 65535.0 if top > 255 else 255.0
    return DicomImage(ds, None, raw, lambda strip: lut(strip).astype(np.float64) / scale, 3)


def dicom_to_pixels(
    ds: pydicom.Dataset,
    window: tuple[float, float] | None = None,
    max_pixels: int | None = None,
    max_aspect: float | None = None,
) -> DicomImage:
    """Check the image (``reading.image_geometry``), decode its pixel data and set up its
    display pipeline: Modality LUT, VOI (or ``window`` = (center, width) override) and
    MONOCHROME1 inversion. Every pixel is run through the checks here (non-finite values,
    lookup tables that cannot be applied), so a DicomImage returned displays without error."""
    geometry = image_geometry(ds, max_pixels, max_aspect)
    check_pixel_length(ds, geometry)
    raw = _decode(ds, geometry)
    if geometry.photometric == "PALETTE COLOR":
        return _palette(ds, raw)
    if raw.ndim == 3:  # RGB (pydicom converts YBR_* to RGB by default)
        top = 2 ** attribute(ds, "BitsStored", whole, geometry.bits_allocated) - 1
        return DicomImage(ds, None, raw, lambda strip: np.clip(strip.astype(np.float64) / top, 0.0, 1.0), 3)
    return _grey(ds, raw, window, geometry.photometric)


def load_dicom_pixels(
    data: bytes,
    window: tuple[float, float] | None = None,
    max_pixels: int | None = None,
    max_aspect: float | None = None,
) -> DicomImage:
    """Parse DICOM bytes within the limits (``reading.read_dicom``) and return the checked
    image with its display pipeline (see ``dicom_to_pixels``)."""
    return dicom_to_pixels(read_dicom(data, max_pixels, max_aspect), window, max_pixels, max_aspect)
