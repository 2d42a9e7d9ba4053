"""How alike two maps are: Spearman rank correlation and SSIM (Wang et al. 2004), the two
figures of the randomisation sanity check (Adebayo et al. 2018)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # Gaussian window of SSIM: 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03
SSIM_SIGMA = 1.5


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties sharing their average rank (scipy's ``rankdata``)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps of equal shape (any float, flattened), in
    [-1, 1]: the Pearson correlation of their average ranks. A constant map orders nothing,
    so its correlation with anything is 0."""
    ra = average_ranks(a.detach().double().cpu().numpy().reshape(-1))
    rb = average_ranks(b.detach().double().cpu().numpy().reshape(-1))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def normalise(m: torch.Tensor) -> torch.Tensor:
    """A map scaled to [0, 1] by min-max (a constant map becomes zeros)."""
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(m)


def _window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity of two H x W maps with values in [0, ``data_range``]:
    Gaussian window (11 x 11, sigma 1.5, shrunk to the map's smaller side when it is shorter),
    K1 = 0.01, K2 = 0.03, population statistics, mean over the valid positions. 1 for equal
    maps; near 0 for unrelated ones."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim needs two H x W maps of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    size = min(SSIM_WINDOW, *a.shape)
    w = _window(size, SSIM_SIGMA)
    x = a.detach().double().cpu().view(1, 1, *a.shape)
    y = b.detach().double().cpu().view(1, 1, *b.shape)
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    vx = F.conv2d(x * x, w) - mx * mx
    vy = F.conv2d(y * y, w) - my * my
    cxy = F.conv2d(x * y, w) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
