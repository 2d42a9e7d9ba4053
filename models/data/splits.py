"""The shared subset rule: ``randperm(n, Generator().manual_seed(seed))[:k]`` over a data
set's path order, so a seeded subset names the same images in every program."""

from __future__ import annotations

import torch

from models.errors import DataError


def seeded_subset(n_total: int, n: int | None, seed: int) -> torch.Tensor:
    """The shared subset rule: ``randperm(n_total, Generator().manual_seed(seed))[:n]``."""
    if n is None or n >= n_total:
        n = n_total
    if n <= 0:
        raise DataError(f"subset size must be positive, got {n}")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]
