"""The most salient area of a saliency map: one box around its peak, in the map's own pixel grid."""

from __future__ import annotations

import numpy as np

SALIENT_FRACTION = 0.5  # a pixel is in the salient area at half the map's peak value or more


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in a 1-D boolean array, stop exclusive."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], row.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def salient_box(saliency: np.ndarray, fraction: float = SALIENT_FRACTION) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the most salient area of ``saliency``: the bounding box of
    the 4-connected region of pixels at ``fraction`` of the map's maximum or more that holds
    its (first, in row-major order) maximum.

    saliency: float (rows, columns), finite (a Grad-CAM map on the source's grid, in [0, 1]);
    the box is in its pixel coordinates, half-open: columns left .. right - 1 and rows
    top .. bottom - 1, so (right - left, bottom - top) is its size in pixels and a map that is
    flat (every pixel its maximum) gives the whole grid. Rows are scanned as runs, so a map of
    a million pixels costs a few milliseconds."""
    values = np.asarray(saliency, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"a saliency map is a non-empty 2-D array, not of shape {values.shape}")
    peak_row, peak_col = np.unravel_index(int(np.argmax(values)), values.shape)
    mask = values >= fraction * values[peak_row, peak_col]
    runs = [_runs(row) for row in mask]
    start = next(run for run in runs[peak_row] if run[0] <= peak_col < run[1])
    seen = {(int(peak_row), start)}
    todo = [(int(peak_row), start)]
    left, top, right, bottom = start[0], peak_row, start[1], peak_row + 1
    while todo:
        row, (lo, hi) = todo.pop()
        left, right = min(left, lo), max(right, hi)
        top, bottom = min(top, row), max(bottom, row + 1)
        for neighbour in (row - 1, row + 1):
            if 0 <= neighbour < len(runs):
                for run in runs[neighbour]:
                    # 4-connected: the runs share at least one column.
                    if run[0] < hi and lo < run[1] and (neighbour, run) not in seen:
                        seen.add((neighbour, run))
                        todo.append((neighbour, run))
    return int(left), int(top), int(right), int(bottom)
