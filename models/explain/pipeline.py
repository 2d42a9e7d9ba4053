"""The one path that explains one image: classification, Grad-CAM of the predicted class,
adversarial explanations of the targets, the faithfulness of each map, the stability score of
the decision, returned as the summary and the arrays every picture is made from
(``ExplainedImage``: the explanation's input, x + delta and delta, and the Grad-CAM map); the
PNGs and DICOM objects are rendered from them at the edge (``models.render.explanation``).
``aex explain --checkpoint`` and the service's explain jobs both call ``explain_images``, so
the offline command gives the result JSON the service gives."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models.defaults import DEFAULT_TARGETS, FAITHFULNESS_STEPS, STABILITY_MODE
from models.explain.adversarial import Explainer, Explanation
from models.explain.faithfulness import delta_map, faithfulness, faithfulness_method
from models.explain.gradcam import gradcam, layer_name, resolve_layer
from models.perturb.stability import stability_evaluations, stability_reports
from models.render.explanation import name_pictures, pictures, png_files

# progress(done, total, phase): one bar over both phases ("search", then "stability").
PhaseProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ExplainedImage:
    """One image explained: the summary (JSON-safe, naming the pictures) and the arrays the
    pictures are rendered from (``explanation``: the input, each target's x + delta and
    delta; ``gradcam``: the Grad-CAM map, float H x W in [0, 1], CPU, the input's grid)."""

    summary: dict
    explanation: Explanation
    gradcam: torch.Tensor

    def pictures(self) -> dict[str, np.ndarray]:
        """Every picture as a uint8 array by file name (``models.render.explanation.pictures``)."""
        return pictures(self.explanation, self.gradcam)

    def png_files(self) -> dict[str, bytes]:
        """Every picture as PNG bytes by file name."""
        return png_files(self.pictures())


def explain_image(
    model: nn.Module,
    classes: Sequence[str] | None,
    image: torch.Tensor,
    targets: Sequence[str | int] = DEFAULT_TARGETS,
    *,
    layer: str | None = None,
    stability_steps: int | None = None,
    stability_mode: str = STABILITY_MODE,
    metrics: dict[str, Any] | None = None,
    progress: PhaseProgress | None = None,
    extra_summary: dict | None = None,
    timings: dict[str, float] | None = None,
    faithfulness_steps: int | None = FAITHFULNESS_STEPS,
    **settings,
) -> ExplainedImage:
    """Adversarial explanations, Grad-CAM of the predicted class and (with
    ``stability_steps``) the stability score of the decision for one image.

    image: float C x H x W in [0, 1]. layer: Grad-CAM layer (dotted name; None: the model's
    default). settings: ``Explainer`` keywords (rho, steps, overshoot, clamp, bound_check).
    metrics: the checkpoint's metrics, whose recorded per-image radii the stability score is
    ranked against (``models.perturb.stability.reference_record``). timings: filled with
    "explain_seconds", "faithfulness_seconds" and "stability_seconds". Returns the summary
    and the arrays (``ExplainedImage``); the summary names the pictures
    (``models.render.explanation.name_pictures``) and also has "gradcam":
    {"layer", "class_index", "faithfulness"}, each target its "faithfulness", "faithfulness"
    the figures' definition and, with ``stability_steps``, "stability".
    """
    (out,) = explain_images(
        model,
        classes,
        image.unsqueeze(0),
        [targets],
        layer=layer,
        stability_steps=stability_steps,
        stability_mode=stability_mode,
        metrics=metrics,
        progress=progress,
        extra_summary=extra_summary,
        timings=[timings] if timings is not None else None,
        faithfulness_steps=faithfulness_steps,
        **settings,
    )
    return out


def explain_images(
    model: nn.Module,
    classes: Sequence[str] | None,
    images: torch.Tensor,
    targets: Sequence[Sequence[str | int]],
    *,
    layer: str | None = None,
    stability_steps: int | None = None,
    stability_mode: str = STABILITY_MODE,
    metrics: dict[str, Any] | None = None,
    progress: PhaseProgress | None = None,
    extra_summary: dict | None = None,
    timings: list[dict[str, float]] | None = None,
    faithfulness_steps: int | None = FAITHFULNESS_STEPS,
    **settings,
) -> list[ExplainedImage]:
    """``explain_image`` of each image of ``images`` (float N x C x H x W in [0, 1]; targets[i]
    those of image i) as one batch: the explanation rows of all images in one search, one
    Grad-CAM pass, the stability searches of all images as rows of one search (a worker's
    batch of explain jobs). ``timings``: one dict per image, filled as ``explain_image``
    fills its own (shared phases give each image the batch's time)."""
    target_layer = resolve_layer(model, layer)  # a bad layer name fails before the search
    n = images.shape[0]
    later = stability_evaluations(stability_steps) if stability_steps else 0
    searched = [0]

    def search_progress(done: int, total: int) -> None:
        searched[0] = total
        if progress is not None:
            progress(done, total + later, "search")

    timings = timings if timings is not None else [{} for _ in range(n)]
    t = time.perf_counter()
    results = Explainer(model, classes, **settings).explain_many(images, targets, progress=search_progress)
    cams = gradcam(model, images, [r.predicted for r in results], layer=target_layer).cpu()
    out = []
    for i, result in enumerate(results):
        summary = {
            **(extra_summary or {}),
            "gradcam": {"layer": layer_name(model, target_layer), "class_index": result.predicted},
            **result.summary(),
        }
        out.append(ExplainedImage(name_pictures(summary, result, with_map=True), result, cams[i]))
    for i in range(n):
        timings[i]["explain_seconds"] = time.perf_counter() - t
    if faithfulness_steps:
        for i, explained in enumerate(out):
            t = time.perf_counter()
            add_faithfulness(explained.summary, model, images[i], cams[i], results[i], int(faithfulness_steps))
            timings[i]["faithfulness_seconds"] = time.perf_counter() - t
    if stability_steps:
        t = time.perf_counter()

        def stability_progress(done: int, total: int) -> None:
            if progress is not None:
                progress(searched[0] + done, searched[0] + total, "stability")

        reports = stability_reports(
            model,
            images,
            results[0].classes,
            metrics,
            steps=stability_steps,
            mode=stability_mode,
            progress=stability_progress,
        )
        for i, explained in enumerate(out):
            explained.summary["stability"] = reports[i]
            timings[i]["stability_seconds"] = time.perf_counter() - t
    return out


def add_faithfulness(
    summary: dict, model: nn.Module, image: torch.Tensor, cam: torch.Tensor, result: Explanation, steps: int
) -> None:
    """Deletion and insertion AUCs of the Grad-CAM map (class: the predicted one) and of each
    explanation's |delta| map (class: its target), with the random order's, into ``summary``
    (["gradcam"]["faithfulness"], each target's "faithfulness", and "faithfulness": the
    definition). One batched forward pass; a class explained twice is measured once."""
    rows = {t.class_index: t for t in result.targets}
    classes = [result.predicted, *rows]
    figures = faithfulness(model, image, [cam, *(delta_map(t.delta) for t in rows.values())], classes, steps=steps)
    summary["gradcam"]["faithfulness"] = figures[0]
    by_class = dict(zip(rows, figures[1:]))
    for target in summary["targets"]:
        target["faithfulness"] = by_class[target["class_index"]]
    summary["faithfulness"] = faithfulness_method(steps)
