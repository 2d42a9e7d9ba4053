"""Adversarial explanations (ALGORITHMS.md "Adversarial explanations").

For one image x and a class c, the explanation is x + delta where delta comes from the
perturbation search in ``explain`` mode (descend the cross-entropy toward c within an RMS
budget rho; rho = 0.1, k = 5, S = 35, mu = 0 as in the reference). Several targets of one
image run as one batch, one row per distinct class. On a robust network the image shows
what the network needs to see for c; on a standard one it looks like noise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aex.errors import BadParameterError

from .imaging import to_png_bytes
from .perturb import ProgressFn, perturbation_search
from .runtime import eval_mode, model_device

EXPLAIN_RHO = 0.1
EXPLAIN_OVERSHOOT = 5.0
EXPLAIN_STEPS = 35
EXPLAIN_MOMENTUM = 0.0
DEFAULT_TARGETS = ("predicted", "runner-up", "all")
_ROLE_ALIASES = {
    "predicted": "predicted", "pred": "predicted", "top": "predicted",
    "runner-up": "runner-up", "runner_up": "runner-up", "runnerup": "runner-up", "second": "runner-up",
}


@dataclass
class TargetExplanation:
    """One explained target.

    role: "predicted", "runner-up" or "class". image: x + delta, C x H x W float (not
    clamped; see ``explanation_uint8`` for display). delta: C x H x W. rms: rms(delta).
    probs_before / probs_after: num_classes softmax at x and at x + delta.
    """

    role: str
    class_index: int
    class_name: str
    image: torch.Tensor
    delta: torch.Tensor
    rms: float
    probs_before: torch.Tensor
    probs_after: torch.Tensor

    @property
    def prob_before(self) -> float:
        return float(self.probs_before[self.class_index])

    @property
    def prob_after(self) -> float:
        return float(self.probs_after[self.class_index])

    def summary(self) -> dict:
        return {
            "role": self.role,
            "class_index": self.class_index,
            "class_name": self.class_name,
            "rms": self.rms,
            "prob_before": self.prob_before,
            "prob_after": self.prob_after,
            "predicted_after": int(self.probs_after.argmax()),
        }


@dataclass
class Explanation:
    """All targets of one image. input: C x H x W in [0, 1] (CPU); probs: num_classes."""

    input: torch.Tensor
    classes: list[str]
    probs: torch.Tensor
    predicted: int
    runner_up: int
    targets: list[TargetExplanation]
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "predicted": {"class_index": self.predicted, "class_name": self.classes[self.predicted],
                          "prob": float(self.probs[self.predicted])},
            "runner_up": {"class_index": self.runner_up, "class_name": self.classes[self.runner_up],
                          "prob": float(self.probs[self.runner_up])},
            "probs": {c: float(p) for c, p in zip(self.classes, self.probs.tolist())},
            "settings": self.settings,
            "targets": [t.summary() for t in self.targets],
        }


def resolve_targets(
    specs: Sequence[str | int], probs: torch.Tensor, classes: Sequence[str]
) -> list[tuple[str, int]]:
    """Turn target specs into (role, class index) pairs, in order.

    A spec is "predicted", "runner-up", "all" (every class in turn), a class index (int or
    digits) or a class name.
    """
    order = probs.argsort(descending=True).tolist()
    predicted = order[0]
    runner_up = order[1] if len(order) > 1 else order[0]
    by_name = {c: i for i, c in enumerate(classes)}
    out: list[tuple[str, int]] = []
    for spec in specs:
        key = spec.strip().lower() if isinstance(spec, str) else spec
        if isinstance(key, str) and key in _ROLE_ALIASES:
            role = _ROLE_ALIASES[key]
            out.append((role, predicted if role == "predicted" else runner_up))
        elif key == "all":
            out.extend(("class", i) for i in range(len(classes)))
        elif isinstance(spec, str) and spec.strip() in by_name:
            out.append(("class", by_name[spec.strip()]))
        elif isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            i = int(key)
            if not 0 <= i < len(classes):
                raise BadParameterError(f"class index {i} is out of range [0, {len(classes)})")
            out.append(("class", i))
        else:
            raise BadParameterError(
                f"unknown target {spec!r}: use predicted, runner-up, all, a class index or one of "
                f"{', '.join(classes)}"
            )
    if not out:
        raise BadParameterError("no targets to explain")
    return out


class Explainer:
    """Adversarial explanations for one model with fixed search settings.

    model: classifier on N x C x H x W in [0, 1]. classes: names by index (default "0".."C-1").
    rho: budget (RMS). bound_check: raise BoundNotReachedError when a target does not reach
    rho within half the steps (the reference does). batch_size: rows per search batch.
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[str] | None = None,
        *,
        rho: float = EXPLAIN_RHO,
        steps: int = EXPLAIN_STEPS,
        overshoot: float = EXPLAIN_OVERSHOOT,
        momentum: float = EXPLAIN_MOMENTUM,
        clamp: bool = False,
        bound_check: bool = True,
        batch_size: int = 64,
    ):
        if batch_size < 1:
            raise BadParameterError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.classes = list(classes) if classes is not None else None
        self.rho, self.steps, self.overshoot, self.momentum = rho, steps, overshoot, momentum
        self.clamp, self.bound_check, self.batch_size = clamp, bound_check, batch_size

    def explain(
        self,
        image: torch.Tensor,
        targets: Sequence[str | int] = DEFAULT_TARGETS,
        progress: ProgressFn | None = None,
    ) -> Explanation:
        """image: float C x H x W in [0, 1]. Returns an Explanation with one entry per target."""
        if image.ndim != 3 or not image.is_floating_point():
            raise BadParameterError(f"image must be a float C x H x W tensor, got {tuple(image.shape)} {image.dtype}")
        device = model_device(self.model)
        x = image.detach().to(device)
        with eval_mode(self.model), torch.no_grad():
            probs = self.model(x.unsqueeze(0))[0].softmax(0).cpu()
        classes = self.classes or [str(i) for i in range(probs.numel())]
        if len(classes) != probs.numel():
            raise BadParameterError(f"{len(classes)} class names for a model with {probs.numel()} outputs")
        wanted = resolve_targets(targets, probs, classes)
        # One row per distinct class: the same target on the same image gives the same result.
        unique = list(dict.fromkeys(c for _, c in wanted))
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        chunks = [unique[i:i + self.batch_size] for i in range(0, len(unique), self.batch_size)]
        per_chunk = self.steps

        for k, chunk in enumerate(chunks):
            def chunk_progress(done: int, _total: int, k: int = k) -> None:
                if progress is not None:
                    progress(k * per_chunk + done, len(chunks) * per_chunk)

            res = perturbation_search(
                self.model, x.unsqueeze(0).expand(len(chunk), -1, -1, -1), chunk, mode="explain",
                steps=self.steps, eps=self.rho, overshoot=self.overshoot, momentum=self.momentum,
                clamp=self.clamp, bound_check=self.bound_check, progress=chunk_progress,
            )
            delta = res.delta.cpu()
            after = res.logits_after.softmax(1).cpu()
            for j, c in enumerate(chunk):
                rows[c] = (delta[j], after[j])

        x_cpu = x.cpu()
        out = []
        for role, c in wanted:
            delta, after = rows[c]
            out.append(TargetExplanation(
                role=role, class_index=c, class_name=classes[c], image=x_cpu + delta, delta=delta,
                rms=float(delta.pow(2).mean().sqrt()), probs_before=probs, probs_after=after,
            ))
        order = probs.argsort(descending=True).tolist()
        return Explanation(
            input=x_cpu, classes=classes, probs=probs, predicted=order[0],
            runner_up=order[1] if len(order) > 1 else order[0], targets=out,
            settings={"rho": self.rho, "steps": self.steps, "overshoot": self.overshoot,
                      "momentum": self.momentum, "clamp": self.clamp, "bound_check": self.bound_check},
        )


def explain(
    model: nn.Module,
    image: torch.Tensor,
    targets: Sequence[str | int] = DEFAULT_TARGETS,
    classes: Sequence[str] | None = None,
    **settings,
) -> Explanation:
    """``Explainer(model, classes, **settings).explain(image, targets)``."""
    return Explainer(model, classes, **settings).explain(image, targets)


def to_uint8_image(chw: torch.Tensor) -> np.ndarray:
    """C x H x W float (clamped to [0, 1]) -> uint8 H x W x 3, or H x W for one channel."""
    arr = chw.detach().float().cpu().clamp(0.0, 1.0).numpy()
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise BadParameterError(f"expected C x H x W with C = 1 or 3, got {arr.shape}")
    arr = (arr * 255.0 + 0.5).astype(np.uint8)
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def explanation_uint8(target: TargetExplanation) -> np.ndarray:
    """The explanation image x + delta clamped to [0, 1] for display, as uint8."""
    return to_uint8_image(target.image)


def difference_uint8(target: TargetExplanation) -> np.ndarray:
    """The perturbation amplified for display: 0.5 + delta / (2 max|delta|), as uint8
    (mid-grey = unchanged; a zero delta gives a flat grey image)."""
    peak = float(target.delta.abs().max())
    scaled = 0.5 + target.delta / (2.0 * peak) if peak > 0 else torch.full_like(target.delta, 0.5)
    return to_uint8_image(scaled)


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:40] or "class"


def render_explanation(
    explanation: Explanation,
    gradcam_map: torch.Tensor | None = None,
    extra_summary: dict | None = None,
) -> tuple[dict, dict[str, bytes]]:
    """The summary and the PNGs of an explanation, in memory: (summary, {file name: PNG bytes}).

    Files: input.png (the input as the model saw it), gradcam.png and gradcam_overlay.png
    (with a map), and per target ``NN_role_class.png`` (x + delta) and ``..._diff.png`` (the
    amplified difference). The summary names them under "files" and in each target."""
    from .gradcam import heatmap_rgb, overlay_rgb

    files = {"input.png": to_png_bytes(to_uint8_image(explanation.input))}
    summary = {**(extra_summary or {}), **explanation.summary(), "files": {"input": "input.png"}}
    if gradcam_map is not None:
        files["gradcam.png"] = to_png_bytes(heatmap_rgb(gradcam_map))
        files["gradcam_overlay.png"] = to_png_bytes(overlay_rgb(explanation.input, gradcam_map))
        summary["files"].update(gradcam="gradcam.png", gradcam_overlay="gradcam_overlay.png")
    for i, (t, s) in enumerate(zip(explanation.targets, summary["targets"])):
        stem = f"{i:02d}_{t.role}_{_safe_name(t.class_name)}"
        files[f"{stem}.png"] = to_png_bytes(explanation_uint8(t))
        files[f"{stem}_diff.png"] = to_png_bytes(difference_uint8(t))
        s["image"], s["difference"] = f"{stem}.png", f"{stem}_diff.png"
    return summary, files


def explain_image(
    model: nn.Module,
    classes: Sequence[str] | None,
    image: torch.Tensor,
    targets: Sequence[str | int] = DEFAULT_TARGETS,
    *,
    layer: str | None = None,
    progress: ProgressFn | None = None,
    extra_summary: dict | None = None,
    **settings,
) -> tuple[dict, dict[str, bytes]]:
    """Adversarial explanations plus Grad-CAM of the predicted class for one image, rendered:
    the one path behind ``aex explain`` and the service's explain jobs.

    image: float C x H x W in [0, 1]. layer: Grad-CAM layer (dotted name; None: the model's
    default). settings: ``Explainer`` keywords (rho, steps, overshoot, clamp, bound_check).
    Returns ``render_explanation``'s (summary, files); the summary also has "gradcam":
    {"layer", "class_index"}.
    """
    from .gradcam import gradcam, layer_name, resolve_layer

    target_layer = resolve_layer(model, layer)  # a bad layer name fails before the search
    result = Explainer(model, classes, **settings).explain(image, targets, progress=progress)
    cam = gradcam(model, image.unsqueeze(0), [result.predicted], layer=target_layer)[0].cpu()
    extra = {**(extra_summary or {}),
             "gradcam": {"layer": layer_name(model, target_layer), "class_index": result.predicted}}
    return render_explanation(result, cam, extra)


def write_files(out_dir: str | os.PathLike, summary: dict, files: dict[str, bytes]) -> None:
    """Write ``files`` and summary.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def write_explanation(
    out_dir: str | os.PathLike,
    explanation: Explanation,
    gradcam_map: torch.Tensor | None = None,
    extra_summary: dict | None = None,
) -> dict:
    """Write input.png, (gradcam.png, gradcam_overlay.png), one PNG per target and its
    amplified difference, and summary.json into ``out_dir``. Returns the summary."""
    summary, files = render_explanation(explanation, gradcam_map, extra_summary)
    write_files(out_dir, summary, files)
    return summary
