"""The inverse of the model's view: where its input lies on the source, and a map on its grid resampled onto the source."""

from __future__ import annotations

import numpy as np

from models.data.imaging import STRIP_PIXELS, model_view


def source_crop_box(width: int, height: int, input_size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in source pixel edges: the region of a ``width`` x ``height``
    source that the model's input_size x input_size input covers (``imaging.model_view``'s
    box scaled back by its block-averaging factor k). When the last block along an axis is
    partial, the box may end up to k - 1 pixels past the image's edge."""
    k, (left, top, right, bottom) = model_view(width, height, input_size)
    return left * k, top * k, right * k, bottom * k


def _axis(n: int, lo: float, hi: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``n`` source pixels along one axis: the two model-grid neighbours, the
    weight of the second and whether the pixel's centre lies in [lo, hi)."""
    centres = np.arange(n, dtype=np.float64) + 0.5
    scale = (hi - lo) / size  # source pixels per model pixel
    u = np.clip((centres - lo) / scale - 0.5, 0.0, size - 1.0)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, size - 1)
    return i0, i1, (u - i0).astype(np.float32), (centres >= lo) & (centres < hi)


def map_to_source(grid: np.ndarray, width: int, height: int, outside: float = 0.0) -> np.ndarray:
    """A map on the model's input grid (float input_size x input_size) resampled bilinearly onto
    the ``width`` x ``height`` source it was computed from: float32 height x width.

    Pixel centres are matched as the forward resize matches them (model pixel j covers source
    coordinates box_left + [j, j + 1) x the box's scale; PyTorch's ``align_corners=False``
    convention), values beyond the outermost model pixel centres are held at the edge value,
    and pixels whose centre lies outside ``source_crop_box`` (what the centre crop cut away)
    are ``outside``. Computed a strip of rows at a time."""
    grid = np.asarray(grid, dtype=np.float32)
    size = grid.shape[0]
    if grid.shape != (size, size):
        raise ValueError(f"the map must be square (the model's input grid), got {grid.shape}")
    left, top, right, bottom = source_crop_box(width, height, size)
    x0, x1, wx, in_x = _axis(width, left, right, size)
    y0, y1, wy, in_y = _axis(height, top, bottom, size)
    columns = grid[:, x0] * (1.0 - wx) + grid[:, x1] * wx  # size x width
    out = np.empty((height, width), dtype=np.float32)
    rows = max(1, STRIP_PIXELS // max(1, width))
    for a in range(0, height, rows):
        b = min(height, a + rows)
        w = wy[a:b, None]
        out[a:b] = columns[y0[a:b]] * (1.0 - w) + columns[y1[a:b]] * w
    out[~in_y, :] = outside
    out[:, ~in_x] = outside
    return out
