"""Faithfulness of a checkpoint's maps over a data set: on the correctly classified images of a
subset, how often the Grad-CAM map and the adversarial explanation's |delta| map of the
predicted class beat the seeded random order (deletion AUC below it, insertion AUC above it),
with the mean AUCs. The per-image figures are the ones an explain job returns
(``models.explain.faithfulness``)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from models.defaults import EXPLAIN_RHO, EXPLAIN_STEPS, FAITHFULNESS_STEPS
from models.explain.adversarial import Explainer
from models.explain.faithfulness import delta_map, faithfulness, faithfulness_method
from models.explain.gradcam import gradcam, layer_name, resolve_layer
from models.nn.runtime import eval_mode

MAPS = ("gradcam", "adversarial")
AUCS = ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc")


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"n": 0}
    t = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in AUCS}
    return {
        "n": len(rows),
        "deletion_below_random": float((t["deletion_auc"] < t["random_deletion_auc"]).double().mean()),
        "insertion_above_random": float((t["insertion_auc"] > t["random_insertion_auc"]).double().mean()),
        **{f"mean_{k}": float(v.mean()) for k, v in t.items()},
    }


def dataset_faithfulness(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    layer: str | None = None,
    steps: int = FAITHFULNESS_STEPS,
    rho: float = EXPLAIN_RHO,
    explain_steps: int = EXPLAIN_STEPS,
) -> dict[str, Any]:
    """Faithfulness figures of the Grad-CAM and adversarial-explanation maps of the predicted
    class on the correctly classified images among ``images`` (uint8 N x C x H x W or float in
    [0, 1]; labels N int64). Returns {"n", "correct", "gradcam": {"n", "deletion_below_random"
    (fraction of images), "insertion_above_random", "mean_deletion_auc", ...}, "adversarial":
    {...}, "settings", "seconds"}; the explanation search runs as an explain job's does (rho,
    steps; bound check off, so no image is dropped)."""
    t0 = time.perf_counter()
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    target = layer_name(model, resolve_layer(model, layer))
    with eval_mode(model), torch.no_grad():
        predicted = torch.cat([model(x[i : i + 100]).argmax(1) for i in range(0, x.shape[0], 100)]).cpu()
    correct = (predicted == labels.cpu()).nonzero().flatten().tolist()
    explainer = Explainer(model, rho=rho, steps=explain_steps, bound_check=False)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in MAPS}
    for i in correct:
        c = int(predicted[i])
        cam = gradcam(model, x[i : i + 1], [c], layer=target)[0].cpu()
        ae = delta_map(explainer.explain(x[i], [c]).targets[0].delta)
        for m, figures in zip(MAPS, faithfulness(model, x[i], [cam, ae], [c, c], steps=steps)):
            rows[m].append(figures)
    return {
        "n": int(x.shape[0]),
        "correct": len(correct),
        **{m: _summary(rows[m]) for m in MAPS},
        "settings": {
            **faithfulness_method(steps),
            "layer": target,
            "rho": float(rho),
            "explain_steps": int(explain_steps),
            "images": "the correctly classified images of the subset; maps of the predicted class",
        },
        "seconds": time.perf_counter() - t0,
    }
