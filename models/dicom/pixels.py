"""DICOM input: turn one single-frame DICOM image into the pixels a model sees.

The display pipeline of PS3.3 C.11, in order: Modality LUT (Rescale Slope/Intercept or a
Modality LUT Sequence), VOI LUT (Window Center/Width with its VOI LUT Function, a VOI LUT
Sequence, or a caller's window override), then Presentation: MONOCHROME1 is inverted so that
bright always means dense. Colour images (RGB, YBR_* converted by pydicom, PALETTE COLOR)
are scaled by their stored bit depth. Pydicom and NumPy only: the service imports this
without torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from models.errors import BadParameterError, UnsupportedMediaError


def is_dicom(data: bytes) -> bool:
    """True for a DICOM Part 10 file (the 'DICM' magic after the 128-byte preamble)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


@dataclass
class DicomImage:
    """pixels: float32 H x W x C in [0, 1] (C = 1 or 3); dataset: the parsed source."""

    pixels: np.ndarray
    dataset: pydicom.Dataset
    window: tuple[float, float] | None  # (center, width) actually applied, if any


def read_dicom(data: bytes) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
        raise UnsupportedMediaError(f"not a readable DICOM file: {exc}") from None


def window_linear(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2, mapped to [0, 1] (float64 in, float64 out)."""
    x = values.astype(np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
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


def _first(value) -> float:
    return float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)


def _check_single_frame_image(ds: pydicom.Dataset) -> None:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = getattr(ds, "SOPClassUID", None)
        name = sop.name if sop is not None else "unknown SOP class"
        raise UnsupportedMediaError(f"DICOM object has no pixel data ({name}); send an image object")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise UnsupportedMediaError(f"invalid Number of Frames {ds.get('NumberOfFrames')!r}") from None
    if frames > 1:
        raise UnsupportedMediaError(f"multi-frame DICOM ({frames} frames) is not supported; send one frame")


def _decode_pixels(ds: pydicom.Dataset) -> np.ndarray:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
        name = ts.name if ts is not None else "unknown transfer syntax"
        if ts is not None and ts.is_compressed:
            raise UnsupportedMediaError(
                f"compressed transfer syntax {name} ({ts}) cannot be decoded here: {exc}"
            ) from None
        raise UnsupportedMediaError(f"DICOM pixel data cannot be decoded ({name}): {exc}") from None


def dicom_to_pixels(ds: pydicom.Dataset, window: tuple[float, float] | None = None) -> DicomImage:
    """Apply Modality LUT, VOI (or ``window`` = (center, width) override) and MONOCHROME1
    inversion; return float32 H x W x C pixels in [0, 1]."""
    _check_single_frame_image(ds)
    raw = _decode_pixels(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, ds).astype(np.float64)
        return DicomImage((rgb / 65535.0 if rgb.max() > 255 else rgb / 255.0).astype(np.float32), ds, None)
    if raw.ndim == 3:  # RGB (pydicom converts YBR_* to RGB by default)
        bits = int(ds.get("BitsStored", 8))
        return DicomImage((raw.astype(np.float64) / (2**bits - 1)).clip(0, 1).astype(np.float32), ds, None)
    if raw.ndim != 2:
        raise UnsupportedMediaError(f"unexpected pixel array shape {raw.shape}")
    values = apply_modality_lut(raw, ds).astype(np.float64)
    applied = None
    if window is not None:
        center, width = float(window[0]), float(window[1])
        out = window_linear(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")))
        applied = (center, width)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        out = window_linear(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")))
        applied = (center, width)
    elif "VOILUTSequence" in ds:
        lut = apply_voi_lut(raw if "ModalityLUTSequence" in ds else values, ds, index=0).astype(np.float64)
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        out = lut / (2**bits - 1)
    else:
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return DicomImage(np.clip(out, 0.0, 1.0).astype(np.float32)[..., None], ds, applied)


def load_dicom_pixels(data: bytes, window: tuple[float, float] | None = None) -> DicomImage:
    """Parse DICOM bytes and return the display-ready pixels (see ``dicom_to_pixels``)."""
    return dicom_to_pixels(read_dicom(data), window)
