"""Images and checkpoints at the edges of their ranges, made here: grey TIFFs of any sample type
holding exactly the values given (Pillow rewrites float64 as float32, so the file is written by
hand), vertical bands of extreme values, DICOM files with extreme Rescale Slope/Intercept, and
tiny checkpoints whose computation goes non-finite, written by the project's own checkpoint
writer. Used by tests/models, tests/worker and tests/service."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e38
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)  # 1.4e-45


def raw_tiff(arr: np.ndarray) -> bytes:
    """A little-endian, uncompressed, one-strip grey TIFF whose samples are ``arr`` (H x W) as
    stored: BitsPerSample and SampleFormat (1 unsigned, 2 signed, 3 float) from its dtype."""
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    h, w = arr.shape
    data = arr.tobytes()
    n = 10
    offset = 8 + 2 + 12 * n + 4  # the pixels follow the one IFD
    kind = {"u": 1, "i": 2, "f": 3}[arr.dtype.kind]
    entries = [
        (256, 4, w),  # ImageWidth, LONG
        (257, 4, h),  # ImageLength
        (258, 3, arr.dtype.itemsize * 8),  # BitsPerSample, SHORT
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # PhotometricInterpretation: BlackIsZero
        (273, 4, offset),  # StripOffsets
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, h),  # RowsPerStrip
        (279, 4, len(data)),  # StripByteCounts
        (339, 3, kind),  # SampleFormat
    ]
    ifd = struct.pack("<H", n)
    for tag, typ, value in entries:
        ifd += struct.pack("<HHI", tag, typ, 1) + (
            struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data


def bands(values, dtype, height: int = 24, width: int = 8) -> np.ndarray:
    """``height`` x (``width`` x len(values)) of ``dtype``: one vertical band per value, left to right."""
    return np.repeat(np.asarray(values, dtype=dtype)[None, :], width, axis=1).repeat(height, axis=0)


def band_means(x) -> list[float]:
    """The mean of each of three equal vertical bands of a C x H x W tensor or array."""
    arr = np.asarray(x, dtype=np.float64)
    w = arr.shape[-1] // 3
    return [float(arr[..., i * w : (i + 1) * w].mean()) for i in range(3)]


def non_finite_or_null(value, path: str = "") -> list[str]:
    """Where a JSON value holds a NaN, an infinity or a null (paths such as ``probs.cat``)."""
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite_or_null(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite_or_null(v, f"{path}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [path]
    return []


# A stability figure that is null by design: a checkpoint without recorded radii has nothing
# to rank against (percentiles, reference), and a search that found nothing has no radius.
NULL_BY_DESIGN = ("attack_percentile", "btr_percentile", "reference", "attack_rms", "btr_rms", "summary")


def unexpected_nulls(result: dict) -> list[str]:
    """``non_finite_or_null`` of a result, less the stability fields null by design and the
    provenance (its optional fields are null when unset)."""
    return [
        p
        for p in non_finite_or_null(result)
        if not p.startswith("provenance") and not (p.startswith("stability.") and p.split(".")[-1] in NULL_BY_DESIGN)
    ]


def nan_checkpoint(path: Path, kind: str, seed: int = 1) -> Path:
    """A tiny 28 x 28 grey, 2-class checkpoint (``tests.support.checkpoints.tiny_checkpoint``) altered so
    that its computation goes non-finite, saved by ``models.store.checkpoint.save_checkpoint``:

    - "inf-weights": its first convolution's weights are +inf, so its logits are NaN for any
      input (0 x inf at a zero pixel or the padding);
    - "backward-overflow": its last batch norm scaled by 1e-6 and its classifier's weights set
      to +-3e38, so the logits stay finite but gradients overflow: what is computed from them
      (an explanation's x + delta) is NaN, which no check of the input or logits can see;
    - "overflowing-classifier": its classifier's weights times 1e38, so the logits of a
      mid-grey image stay finite (about 2e37) and those of a black or white one overflow.
    """
    import torch

    from models.store.checkpoint import load_checkpoint, save_checkpoint
    from tests.support.checkpoints import tiny_checkpoint

    base = path.with_name(path.stem + "-base.safetensors")
    tiny_checkpoint(base, 1, 28, ["normal", "pneumonia"], seed=seed)
    model, meta = load_checkpoint(base)
    base.unlink()
    with torch.no_grad():
        if kind == "inf-weights":
            next(p for p in model.parameters() if p.ndim == 4).fill_(float("inf"))
        elif kind == "backward-overflow":
            modules = dict(model.named_modules())
            modules["pipe.4"].weight.mul_(1e-6)
            modules["pipe.4"].bias.mul_(1e-6)
            classifier = modules["pipe.7"].weight
            classifier.copy_(torch.sign(classifier) * 3e38)
        elif kind == "overflowing-classifier":
            dict(model.named_modules())["pipe.7"].weight.mul_(1e38)
        else:
            raise ValueError(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, meta)
    return path
