"""Accuracy-Robustness Area (ALGORITHMS.md "Accuracy-Robustness Area").

For each test image, r_i = rms of the smallest perturbation found that flips the decision
(attack ARA, search mode ``l2min``) or brings p_y down to chance (BTR ARA, mode ``btr``),
0 for an image already wrong. A(rho) = fraction of images with r_i > rho, and
ARA = integral over rho of max(0, A(rho) - 1/C), computed exactly as the reference does with
a 1000-bin histogram of r over [0, max r]."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from models.defaults import ARA_BINS, ARA_EPS, ARA_MOMENTUM, ARA_OVERSHOOT, ARA_STEPS
from models.errors import BadParameterError
from models.nn.runtime import model_device
from models.perturb.engine import perturbation_search

SEARCHES = {"attack": "l2min", "btr": "btr"}


@dataclass
class AraCurve:
    """A(rho) sampled at bins + 1 points from 0 to max r (exact fractions, not binned)."""

    rho: np.ndarray
    accuracy: np.ndarray


@dataclass
class AraResult:
    """accuracy: clean accuracy of the n images; attack_ara / btr_ara: the two areas;
    attack_r / btr_r: per-image rms radii (float64, 0 where already wrong)."""

    accuracy: float
    attack_ara: float
    btr_ara: float
    n: int
    num_classes: int
    attack_r: np.ndarray
    btr_r: np.ndarray
    attack_curve: AraCurve
    btr_curve: AraCurve
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready figures (no arrays)."""
        return {
            "accuracy": self.accuracy,
            "attack_ara": self.attack_ara,
            "btr_ara": self.btr_ara,
            "n": self.n,
            "num_classes": self.num_classes,
            **self.settings,
        }

    def metrics_record(self, data: str, seed: int) -> dict:
        """The figures as a checkpoint's ``metrics`` store them (``aex evaluate --record`` and
        the trainer's final figures): both areas, the clean accuracy, n, seed, the search
        settings and the per-image radii. data: how the data set is named (no machine path)."""
        return {
            "ara_attack": self.attack_ara,
            "ara_btr": self.btr_ara,
            "ara_accuracy": self.accuracy,
            "ara_n": self.n,
            "ara_seed": seed,
            "ara_settings": self.settings,
            # Per-image radii: the stability score ranks single images against them.
            "ara_radii": self.radii_record(data, seed),
        }

    def radii_record(self, data: str, seed: int) -> dict:
        """The per-image radii as stored in a checkpoint's ``metrics["ara_radii"]``; the
        stability score ranks one image's radii against these."""
        return {
            "data": data,
            "n": self.n,
            "seed": seed,
            "attack": [round(float(r), 7) for r in self.attack_r],
            "btr": [round(float(r), 7) for r in self.btr_r],
            "settings": dict(self.settings),
        }


def _radii(r) -> torch.Tensor:
    r = torch.as_tensor(np.asarray(r, dtype=np.float64)).reshape(-1)
    if r.numel() == 0:
        raise BadParameterError("ARA needs at least one radius")
    if bool((r < 0).any()) or not bool(torch.isfinite(r).all()):
        raise BadParameterError("radii must be finite and >= 0")
    return r


def ara_from_radii(r, num_classes: int, bins: int = ARA_BINS) -> float:
    """``sum_bins w * max(0, 1 - cumsum(hist)/N - 1/C)`` with w = max r / bins.

    r: N radii (any array-like). Returns 0 when every radius is 0.
    """
    r = _radii(r)
    r_max = float(r.max())
    if r_max == 0.0:
        return 0.0  # histc would fall back to the data range; there is no area at all
    hist = torch.histc(r, bins=bins, min=0.0, max=r_max)
    width = r_max / bins
    above = 1.0 - hist.cumsum(0) / r.numel() - 1.0 / num_classes
    return float(width * above.clamp(min=0.0).sum())


def accuracy_curve(r, points: int = ARA_BINS + 1, r_max: float | None = None) -> AraCurve:
    """A(rho) = fraction of r > rho, at ``points`` values of rho from 0 to r_max (max r)."""
    r = _radii(r).numpy()
    top = float(r.max()) if r_max is None else float(r_max)
    rho = np.linspace(0.0, top, points)
    srt = np.sort(r)
    above = r.size - np.searchsorted(srt, rho, side="right")
    return AraCurve(rho=rho, accuracy=above / r.size)


def compute_ara(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 100,
    steps: int = ARA_STEPS,
    eps: float = ARA_EPS,
    overshoot: float = ARA_OVERSHOOT,
    momentum: float = ARA_MOMENTUM,
    bound_check: bool = True,
    clamp: bool = False,
    progress: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> AraResult:
    """Run the attack (l2min) and BTR searches over ``images`` in batches.

    images: uint8 N x C x H x W in [0, 255] or float in [0, 1], on any device (each batch
    moves to the model's device). labels: N int64. ``progress`` shows a tqdm bar on
    stderr (batches, ticking per search step); ``on_batch(done, total)`` is called after
    each batch (for workers). Raises BoundNotReachedError (from the search) if
    ``bound_check`` and some image needs more than half of the steps to flip.
    """
    n = int(labels.numel())
    if images.shape[0] != n or n == 0:
        raise BadParameterError(f"need as many labels as images (>0), got {images.shape[0]} and {n}")
    if batch_size < 1:
        raise BadParameterError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    radii = {name: [] for name in SEARCHES}
    correct = 0
    num_classes = None
    starts = list(range(0, n, batch_size))
    bar = None
    if progress:
        from tqdm import tqdm

        # One tick per search evaluation, so a slow CPU batch still shows movement.
        bar = tqdm(total=len(starts) * len(SEARCHES) * (steps + 1), desc="ARA", unit="step", leave=False)

    shown = [0]  # evaluations of the current search already added to the bar

    def tick(done: int, _total: int) -> None:
        if bar is not None and done > shown[0]:
            bar.update(done - shown[0])
        shown[0] = done

    try:
        for i, start in enumerate(starts):
            xb = images[start : start + batch_size].to(device)
            xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
            yb = labels[start : start + batch_size].to(device)
            for name, mode in SEARCHES.items():
                if bar is not None:
                    bar.set_description(f"ARA batch {i + 1}/{len(starts)} {name}")
                shown[0] = 0
                res = perturbation_search(
                    model,
                    xb,
                    yb,
                    mode=mode,
                    steps=steps,
                    eps=eps,
                    overshoot=overshoot,
                    momentum=momentum,
                    clamp=clamp,
                    bound_check=bound_check,
                    with_logits_after=False,
                    progress=tick,
                )
                radii[name].append(res.rms.double().cpu())
                if name == "attack":
                    correct += int((res.logits_before.argmax(1) == yb).sum())
                    num_classes = int(res.logits_before.shape[1])
            if on_batch is not None:
                on_batch(i + 1, len(starts))
    finally:
        if bar is not None:
            bar.close()

    attack_r = torch.cat(radii["attack"]).numpy()
    btr_r = torch.cat(radii["btr"]).numpy()
    return AraResult(
        accuracy=correct / n,
        attack_ara=ara_from_radii(attack_r, num_classes),
        btr_ara=ara_from_radii(btr_r, num_classes),
        n=n,
        num_classes=num_classes,
        attack_r=attack_r,
        btr_r=btr_r,
        attack_curve=accuracy_curve(attack_r),
        btr_curve=accuracy_curve(btr_r),
        settings={"steps": steps, "eps": eps, "overshoot": overshoot, "momentum": momentum, "clamp": clamp},
    )
