"""The fast stability search against the exact one on a checkpoint's evaluation subset: its
per-image radii (the reference a fast score ranks against) and how well they agree.

``aex evaluate --stability`` runs the fast search (``models.perturb.minimal``) on the seeded
subset at each image's true label, exactly as the ARA evaluation runs the exact search (radius
0 for an image already misclassified, or already at chance), and compares the radii with the
exact ones the checkpoint records (``metrics["ara_radii"]``) when they were computed on the
same subset. ``--record`` stores the fast radii as ``metrics["fast_radii"]`` with the agreement
figures, so a fast score's percentiles rank against radii of its own search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.defaults import ARA_EPS, ARA_MOMENTUM, ARA_OVERSHOOT, ARA_STEPS
from models.perturb.ara import SEARCHES
from models.perturb.minimal import FastSettings, minimal_radii


def fast_radii(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 8, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Fast radii of both searches: images uint8 (or float in [0, 1]) N x C x H x W, labels N.
    Returns {"attack": N float64, "btr": N float64} (0: past the bound at delta = 0). Batches
    of 8 images (16 rows) run the way the service runs one image's score, through the
    channels-last copy on the CPU (``models.nn.layout``), so the figures are the served ones'."""
    from tqdm import tqdm

    x_all = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in SEARCHES}
    starts = range(0, x_all.shape[0], batch_size)
    for start in tqdm(starts, desc="fast radii", unit="batch", disable=not progress):
        res = minimal_radii(model, x_all[start : start + batch_size], labels[start : start + batch_size], mode="fast")
        for name in SEARCHES:
            out[name].append(res.rms[name])
    return {name: torch.cat(parts) for name, parts in out.items()}


def agreement(fast: torch.Tensor, exact: torch.Tensor) -> dict[str, Any]:
    """How the fast radii (N) agree with the exact ones (N) of the same images: relative error
    |fast / exact - 1| on the images with an exact radius above 0 (median, largest, counts over
    5% and 15%), and whether the zeros coincide (both searches decide them from the same
    forward pass at delta = 0)."""
    fast, exact = fast.double(), exact.double()
    nonzero = exact > 0
    rel = (fast[nonzero] / exact[nonzero] - 1).abs()
    return {
        "n": int(exact.numel()),
        "compared": int(nonzero.sum()),
        "median_rel_err": round(float(rel.median()), 5) if rel.numel() else None,
        "max_rel_err": round(float(rel.max()), 5) if rel.numel() else None,
        "over_5pct": int((rel > 0.05).sum()),
        "over_15pct": int((rel > 0.15).sum()),
        "zeros_coincide": bool(torch.equal(fast == 0, exact == 0)),
    }


def fast_radii_record(
    radii: dict[str, torch.Tensor], data: str, seed: int, exact: dict[str, Any] | None
) -> dict[str, Any]:
    """What ``metrics["fast_radii"]`` stores: the per-image radii, n, seed, data, the settings
    (ARA settings plus the fast search's own), and, when the checkpoint records exact radii of
    the same subset, the agreement with them."""
    n = int(next(iter(radii.values())).numel())
    record: dict[str, Any] = {
        "data": data,
        "n": n,
        "seed": seed,
        **{name: [round(float(r), 7) for r in radii[name]] for name in SEARCHES},
        "settings": {
            "steps": ARA_STEPS,
            "eps": ARA_EPS,
            "overshoot": ARA_OVERSHOOT,
            "momentum": ARA_MOMENTUM,
            "mode": "fast",
            "fast": FastSettings().as_dict(),
        },
    }
    if same_subset(exact, data, seed, n):
        record["agreement"] = {
            name: agreement(radii[name], torch.tensor(exact[name], dtype=torch.float64)) for name in SEARCHES
        }
    return record


def same_subset(exact: dict[str, Any] | None, data: str, seed: int, n: int) -> bool:
    """Whether a recorded ``ara_radii`` was computed on this very subset (data, seed, n)."""
    return (
        isinstance(exact, dict)
        and _same_data(str(exact.get("data")), data)
        and int(exact.get("seed", -1)) == seed
        and int(exact.get("n", -1)) == n
        and all(len(exact.get(name) or []) == n for name in SEARCHES)
    )


def _same_data(recorded: str, data: str) -> bool:
    """The same data set: the same name, or the same file name (a data set outside the working
    directory is recorded by its file name alone, one inside by its relative path)."""
    return recorded == data or Path(recorded).name == Path(data).name
