"""Stability score: how far one decision is from flipping, ranked against test images.

For one image and its predicted class c, the l2min search (attack ARA's) finds the
smallest rms perturbation that changes the decision, and the btr search (BTR ARA's) the
smallest that makes p_c no better than chance (1/C). Both use the ARA settings (S 450,
eps 20, k 1, mu 0.9), so a correctly classified test image gets exactly the per-image
radius the ARA evaluation computes for it. Each radius is also given as a percentile of
the radii stored in the checkpoint (``metrics["ara_radii"]``, recorded by the trainer or
``aex evaluate --ara --record``): "more stable than 80% of test images".
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.defaults import ARA_EPS, ARA_MOMENTUM, ARA_OVERSHOOT, ARA_STEPS
from models.perturb.ara import SEARCHES
from models.perturb.engine import ProgressFn, perturbation_search


def percentile_of(value: float, reference: Sequence[float]) -> float | None:
    """Percent of ``reference`` strictly below ``value`` (None without a reference)."""
    if not reference:
        return None
    ordered = sorted(float(r) for r in reference)
    return 100.0 * bisect_left(ordered, float(value)) / len(ordered)


def stability_score(
    model: nn.Module,
    image: torch.Tensor,
    reference_radii: dict[str, Sequence[float]] | None = None,
    *,
    steps: int = ARA_STEPS,
    eps: float = ARA_EPS,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Both radii for ``image`` (float C x H x W in [0, 1]) at its predicted class.

    Returns {"predicted", "attack_rms", "btr_rms", "attack_percentile", "btr_percentile",
    "reference_n", "settings"}; percentiles are None when no reference radii are known.
    ``progress(done, total)`` counts search evaluations over both searches.
    """
    x = image.unsqueeze(0)
    with torch.no_grad():
        predicted = int(model(x.to(next(model.parameters()).device)).argmax(1)[0])
    total = 2 * (steps + 1)
    out: dict[str, Any] = {"predicted": predicted}
    for k, (name, mode) in enumerate(SEARCHES.items()):

        def report(done: int, _total: int, offset: int = k * (steps + 1)) -> None:
            if progress is not None:
                progress(offset + done, total)

        res = perturbation_search(
            model,
            x,
            [predicted],
            mode=mode,
            steps=steps,
            eps=eps,
            overshoot=ARA_OVERSHOOT,
            momentum=ARA_MOMENTUM,
            bound_check=False,
            with_logits_after=False,
            progress=report,
        )
        r = float(res.rms[0])
        out[f"{name}_rms"] = r
        out[f"{name}_found"] = bool(res.found[0])
        out[f"{name}_percentile"] = percentile_of(r, (reference_radii or {}).get(name, []))
    out["reference_n"] = len((reference_radii or {}).get("attack", []))
    out["settings"] = {"steps": steps, "eps": eps, "overshoot": ARA_OVERSHOOT, "momentum": ARA_MOMENTUM}
    return out


def stability_evaluations(steps: int) -> int:
    """Search evaluations of one stability score (two searches of steps + 1 evaluations)."""
    return 2 * (int(steps) + 1)


def stability_method(steps: int) -> dict[str, Any]:
    """Every setting of the stability searches, as a result's provenance states them."""
    return {
        "searches": dict(SEARCHES),
        "steps": int(steps),
        "eps": ARA_EPS,
        "overshoot": ARA_OVERSHOOT,
        "momentum": ARA_MOMENTUM,
        "clamp": False,
    }


def stability_report(
    model: nn.Module,
    image: torch.Tensor,
    classes: Sequence[str],
    ara_radii: dict[str, Any] | None,
    *,
    steps: int = ARA_STEPS,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """The stability score of ``image`` (float C x H x W in [0, 1]) at its predicted class,
    with the reference it is ranked against and a sentence a reviewer can read.

    ara_radii: the checkpoint's ``metrics["ara_radii"]`` record (per-image radii, n, seed,
    data, settings), or None. Returns ``stability_score``'s dict plus "predicted_name",
    "reference", "comparable" (both searches used the same settings, so percentiles rank like
    against like) and "summary"."""
    radii = ara_radii if isinstance(ara_radii, dict) else None
    reference = {k: list(radii.get(k) or []) for k in SEARCHES} if radii else None
    score = stability_score(model, image, reference, steps=steps, progress=progress)
    score["predicted_name"] = classes[score["predicted"]]
    if radii:
        ref_settings = radii.get("settings") or {}
        score["reference"] = {k: radii.get(k) for k in ("n", "seed", "data")} | {"settings": ref_settings}
        score["comparable"] = all(
            ref_settings.get(k) == v
            for k, v in (("steps", steps), ("eps", ARA_EPS), ("overshoot", ARA_OVERSHOOT), ("momentum", ARA_MOMENTUM))
        )
        parts = [
            f"{score[f'{name}_percentile']:.0f}% ({label})"
            for name, label in (("attack", "decision flip"), ("btr", "no better than chance"))
            if score.get(f"{name}_percentile") is not None
        ]
        score["summary"] = (
            (
                f"this decision is more stable than {' and '.join(parts)} of the "
                f"{score['reference_n']} evaluation images of the checkpoint"
            )
            if parts
            else None
        )
    else:
        score["reference"], score["comparable"] = None, False
        score["summary"] = "the checkpoint records no per-image ARA radii, so no percentiles"
    return score
