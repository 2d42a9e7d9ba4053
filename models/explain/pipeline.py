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
from models.explain.beside import Beside, PhaseProgress, side_by_side
from models.explain.faithfulness import delta_map, faithfulness, faithfulness_method
from models.explain.gradcam import gradcam, layer_name, resolve_layer
from models.nn.compiled import accelerate_default
from models.nn.inference import inference_copy
from models.nn.runtime import eval_mode, model_device
from models.perturb.stability import stability_evaluations, stability_reports
from models.render.explanation import name_pictures, pictures, png_files


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
    beside: bool | None = None,
    **settings,
) -> list[ExplainedImage]:
    """``explain_image`` of each image of ``images`` (float N x C x H x W in [0, 1]; targets[i]
    those of image i) as one batch: the explanation rows of all images in one search, one
    Grad-CAM pass, the stability searches of all images as rows of one search (a worker's
    batch of explain jobs). ``timings``: one dict per image, filled as ``explain_image``
    fills its own (shared phases give each image the batch's time). Where the CPU has cores
    to spare beyond torch's threads, the stability searches run on a thread of their own
    beside the other phases (``models.explain.beside``), with the same numbers; ``beside``
    True or False asks for it or against it whatever the CPU."""
    target_layer = resolve_layer(model, layer)  # a bad layer name fails before the search
    n = images.shape[0]
    timings = timings if timings is not None else [{} for _ in range(n)]
    later = stability_evaluations(stability_steps) if stability_steps else 0
    searched = [0]

    def search_progress(done: int, total: int) -> None:
        searched[0] = total
        if progress is not None:
            progress(done, total + later, "search")

    def stability_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(searched[0] + done, searched[0] + total, "stability")

    def explained(report: Callable[[int, int], None]) -> tuple[list[ExplainedImage], list[str]]:
        """The explanations, Grad-CAM and faithfulness of every image, and the class names."""
        t = time.perf_counter()
        results = Explainer(model, classes, **settings).explain_many(images, targets, progress=report)
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
            for i, image in enumerate(out):
                t = time.perf_counter()
                add_faithfulness(image.summary, model, images[i], cams[i], results[i], int(faithfulness_steps))
                timings[i]["faithfulness_seconds"] = time.perf_counter() - t
        return out, results[0].classes

    def stability(names: Sequence[str], report: Callable[[int, int], None], predicted=None) -> list[dict[str, Any]]:
        t = time.perf_counter()
        reports = stability_reports(
            model,
            images,
            names,
            metrics,
            steps=stability_steps,
            mode=stability_mode,
            progress=report,
            predicted=predicted,
        )
        for i in range(n):
            timings[i]["stability_seconds"] = time.perf_counter() - t
        return reports

    with eval_mode(model):  # once for both phases: neither switches the modules' modes under the other
        apart = _apart(model, classes, images, settings, beside) if stability_steps and beside is not False else None
        if apart is None:
            out, names = explained(search_progress)
            reports = stability(names, stability_progress) if stability_steps else []
        else:
            names, predicted = apart
            searches = Beside(lambda report: stability(names, report, predicted), progress, later)
            with searches:
                out, _ = explained(searches.search)
            reports = searches.finish()
    for image, report in zip(out, reports):
        image.summary["stability"] = report
    return out


def _apart(
    model: nn.Module,
    classes: Sequence[str] | None,
    images: torch.Tensor,
    settings: dict[str, Any],
    wanted: bool | None,
) -> tuple[list[str], torch.Tensor] | None:
    """(class names, each image's predicted class) for stability searches run beside the other
    phases (``models.explain.beside``), or None where they run after them: ``side_by_side``
    says no (unless ``wanted``), the searches are compiled (``torch.compile``d code is not called from two threads
    at once), or the class names do not fit the model (the explanation then says so)."""
    device = model_device(model)
    if settings.get("accelerate") or accelerate_default() or not (wanted or side_by_side(device)):
        return None
    with torch.no_grad():
        logits = model(images.to(device))
    if classes is not None and len(classes) != logits.shape[1]:
        return None
    if device.type == "cpu":
        inference_copy(model)  # the searches' copy made here, not by both threads at once
    return (list(classes) if classes is not None else [str(i) for i in range(logits.shape[1])]), logits.argmax(1).cpu()


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
