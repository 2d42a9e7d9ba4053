"""Stability score: how far one decision is from flipping, ranked against test images.

For one image and its predicted class c, the l2min search (attack ARA's) finds the
smallest rms perturbation that changes the decision, and the btr search (BTR ARA's) the
smallest that makes p_c no better than chance (1/C), both with the ARA settings (S 450,
eps 20, k 1, mu 0.9). ``mode="exact"`` runs those two searches, so a correctly classified
test image gets exactly the per-image radius the ARA evaluation computes for it;
``mode="fast"`` (the default) estimates the same radii in a fraction of the evaluations
(``models.perturb.minimal``: the search's opening steps, then a settling decay scaled to each
radius, both searches as rows of one batch). Each radius is also given as a percentile of the
radii stored in the checkpoint (``metrics["ara_radii"]``, recorded by the trainer or ``aex
evaluate --ara --record`` with the exact search): "more stable than 80% of test images".
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.defaults import ARA_EPS, ARA_MOMENTUM, ARA_OVERSHOOT, ARA_STEPS, STABILITY_MODE
from models.errors import BadParameterError
from models.nn.runtime import eval_mode, model_device
from models.perturb.ara import SEARCHES
from models.perturb.engine import ProgressFn
from models.perturb.minimal import RADIUS_MODES, FastSettings, fast_applies, minimal_radii

# Key of a checkpoint's metrics holding the fast search's per-image radii (``aex evaluate
# --stability --record``), the reference a fast score ranks against.
FAST_RADII = "fast_radii"


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
    mode: str = STABILITY_MODE,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Both radii for ``image`` (float C x H x W in [0, 1]) at its predicted class.

    mode: "fast" (default) or "exact" (the ARA's two searches). Returns {"predicted",
    "attack_rms", "btr_rms", "attack_found", "btr_found", "attack_percentile",
    "btr_percentile", "reference_n", "settings"}; percentiles are None when no reference radii
    are known; "settings" holds the ARA settings the radii mean and "mode", the mode that ran
    (with "fast", the fast search's own parameters). ``progress(done, total)`` runs to
    ``stability_evaluations(steps)`` (the exact searches' evaluations) in both modes, so a
    progress bar means the same in both.
    """
    return stability_scores(
        model, image.unsqueeze(0), reference_radii, steps=steps, eps=eps, mode=mode, progress=progress
    )[0]


def stability_scores(
    model: nn.Module,
    images: torch.Tensor,
    reference_radii: dict[str, Sequence[float]] | None = None,
    *,
    steps: int = ARA_STEPS,
    eps: float = ARA_EPS,
    mode: str = STABILITY_MODE,
    progress: ProgressFn | None = None,
    predicted: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """``stability_score`` of each image of ``images`` (float N x C x H x W in [0, 1]), the
    searches of all images as rows of one batch (a worker's batch of classify jobs). Each
    image's radii are those it gets alone, up to float rounding (rows never interact).
    ``predicted``: the images' classes (``predicted_classes``) when the caller has them."""
    if mode not in RADIUS_MODES:
        raise BadParameterError(f"stability mode must be one of {', '.join(RADIUS_MODES)}, got {mode!r}")
    if images.ndim != 4:
        raise BadParameterError(f"images must be N x C x H x W, got {tuple(images.shape)}")
    predicted = predicted_classes(model, images) if predicted is None else predicted
    total = stability_evaluations(steps)

    def report(done: int, of: int) -> None:
        if progress is not None:
            progress(total if done >= of else (done * total) // max(of, 1), total)

    res = minimal_radii(model, images, predicted, mode=mode, steps=steps, eps=eps, progress=report)
    settings = {"steps": steps, "eps": eps, "overshoot": ARA_OVERSHOOT, "momentum": ARA_MOMENTUM, "mode": res.mode}
    if res.mode == "fast":
        settings["fast"] = res.settings["fast"]
    out = []
    for i in range(images.shape[0]):
        score: dict[str, Any] = {"predicted": int(predicted[i])}
        for name in SEARCHES:
            r = float(res.rms[name][i])
            score[f"{name}_rms"] = r
            score[f"{name}_found"] = bool(res.found[name][i])
            score[f"{name}_percentile"] = percentile_of(r, (reference_radii or {}).get(name, []))
        score["reference_n"] = len((reference_radii or {}).get("attack", []))
        score["settings"] = dict(settings)
        out.append(score)
    return out


def predicted_classes(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class ``model`` (in eval mode) gives each image of ``images`` (float N x C x H x W
    in [0, 1]): int64 N, on the CPU."""
    with eval_mode(model), torch.no_grad():
        return model(images.to(model_device(model))).argmax(1).cpu()


def stability_evaluations(steps: int) -> int:
    """The progress total of one stability score: the evaluations of the two exact searches
    (steps + 1 each). A fast score reports its progress scaled to the same total."""
    return 2 * (int(steps) + 1)


def stability_method(steps: int, mode: str = STABILITY_MODE) -> dict[str, Any]:
    """Every setting of the stability searches, as a result's provenance states them: the
    ARA settings the radii mean and the mode that computes them ("fast" with its own
    parameters; a fast request with any S but the ARA's 450, for which the fast search is
    measured, runs, and says, "exact")."""
    method: dict[str, Any] = {
        "searches": dict(SEARCHES),
        "steps": int(steps),
        "eps": ARA_EPS,
        "overshoot": ARA_OVERSHOOT,
        "momentum": ARA_MOMENTUM,
        "clamp": False,
    }
    fast = FastSettings()
    if mode == "fast" and fast_applies(steps, fast):
        return method | {"mode": "fast", "fast": fast.as_dict()}
    return method | {"mode": "exact"}


def reference_record(metrics: dict[str, Any] | None, mode: str = STABILITY_MODE) -> dict[str, Any] | None:
    """The per-image radii a score of ``mode`` ranks against, from a checkpoint's metrics:
    those of the same search (``metrics["fast_radii"]`` for "fast", recorded by ``aex evaluate
    --stability --record``; ``metrics["ara_radii"]`` for "exact", the ARA's own), else the
    exact ones (then the report says the searches differ)."""
    metrics = metrics if isinstance(metrics, dict) else {}
    own = metrics.get(FAST_RADII if mode == "fast" else "ara_radii")
    record = own if isinstance(own, dict) else metrics.get("ara_radii")
    return record if isinstance(record, dict) else None


def stability_report(
    model: nn.Module,
    image: torch.Tensor,
    classes: Sequence[str],
    metrics: dict[str, Any] | None,
    *,
    steps: int = ARA_STEPS,
    mode: str = STABILITY_MODE,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """The stability score of ``image`` (float C x H x W in [0, 1]) at its predicted class,
    with the reference it is ranked against and a sentence a reviewer can read.

    metrics: the checkpoint's metrics (its recorded per-image radii: ``reference_record``), or
    None. mode: "fast" (default) or "exact", as ``stability_score``. Returns
    ``stability_score``'s dict plus "predicted_name", "reference", "comparable" (the reference
    radii come from the same search with the same settings, so percentiles rank like against
    like) and "summary"."""
    return stability_reports(model, image.unsqueeze(0), classes, metrics, steps=steps, mode=mode, progress=progress)[0]


def stability_reports(
    model: nn.Module,
    images: torch.Tensor,
    classes: Sequence[str],
    metrics: dict[str, Any] | None,
    *,
    steps: int = ARA_STEPS,
    mode: str = STABILITY_MODE,
    progress: ProgressFn | None = None,
    predicted: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """``stability_report`` of each image of ``images`` (float N x C x H x W in [0, 1]), all
    searches as rows of one batch (``predicted``: as ``stability_scores``)."""
    radii = reference_record(metrics, mode)
    reference = {k: list(radii.get(k) or []) for k in SEARCHES} if radii else None
    scores = stability_scores(model, images, reference, steps=steps, mode=mode, progress=progress, predicted=predicted)
    return [_report(score, classes, radii, steps) for score in scores]


def _report(score: dict[str, Any], classes: Sequence[str], radii: dict[str, Any] | None, steps: int) -> dict[str, Any]:
    score["predicted_name"] = classes[score["predicted"]]
    if not radii:
        score["reference"], score["comparable"] = None, False
        score["summary"] = "the checkpoint records no per-image ARA radii, so no percentiles"
        return score
    ref_settings = radii.get("settings") or {}
    score["reference"] = {k: radii.get(k) for k in ("n", "seed", "data")} | {"settings": ref_settings}
    ran = score["settings"]
    score["comparable"] = (
        all(
            ref_settings.get(k) == v
            for k, v in (("steps", steps), ("eps", ARA_EPS), ("overshoot", ARA_OVERSHOOT), ("momentum", ARA_MOMENTUM))
        )
        and ref_settings.get("mode", "exact") == ran["mode"]
        and ref_settings.get("fast") == ran.get("fast")
    )
    parts = [
        f"{score[f'{name}_percentile']:.0f}% ({label})"
        for name, label in (("attack", "decision flip"), ("btr", "no better than chance"))
        if score.get(f"{name}_percentile") is not None
    ]
    score["summary"] = (
        f"this decision is more stable than {' and '.join(parts)} of the "
        f"{score['reference_n']} evaluation images of the checkpoint"
        if parts
        else None
    )
    return score
