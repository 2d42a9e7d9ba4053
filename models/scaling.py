"""Scaling values into [0, 1] without overflow, and counting the values that are not finite.

NumPy only, torch-free: the one home of these conversions for images (``models.data.imaging``)
and DICOM pixels (``models.dicom.pixels``), so that the API's admission and the workers scale
every input alike. Scalings run in float64 and only their results, in [0, 1], are narrowed to
float32 by the callers: a float32 image spans at most 6.8e38, which float64 holds, and a span
beyond float64 itself (two values near +-1.8e308) is halved before it is divided, so finite
values never become infinite or NaN on their way to the network.
"""

from __future__ import annotations

import math

import numpy as np


def unit_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(values - lo) / (hi - lo)`` clipped to [0, 1], as float64 of the same shape.

    ``lo`` <= ``hi``: finite, usually the extrema of the whole image (a strip is scaled by the
    image's range). An image whose values are all equal (``hi == lo``) has no range to scale:
    it is all 0 (black), never 0 / 0. Subnormal spans are divided as they are (exact to the
    last bit float64 has); a span that overflows float64 is halved, values and bounds alike.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"a range to scale by needs finite lo <= hi, got {lo!r}, {hi!r}")
    x = np.asarray(values, dtype=np.float64)
    if hi == lo:
        return np.zeros(x.shape, dtype=np.float64)
    span = hi - lo
    if math.isfinite(span):
        out = (x - lo) / span
    else:  # hi - lo is over 1.8e308: every term halved stays finite, and the ratio is the same
        out = (x * 0.5 - lo * 0.5) / (hi * 0.5 - lo * 0.5)
    return np.clip(out, 0.0, 1.0)


def non_finite_counts(arr: np.ndarray) -> tuple[int, int, int]:
    """(NaN, +inf, -inf) counts of an array (all 0 for integers)."""
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.inexact):
        return 0, 0, 0
    return int(np.isnan(arr).sum()), int(np.isposinf(arr).sum()), int(np.isneginf(arr).sum())
