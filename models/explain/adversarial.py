"""Adversarial explanations (ALGORITHMS.md "Adversarial explanations").

For one image x and a class c, the explanation is x + delta where delta comes from the
perturbation search in ``explain`` mode (descend the cross-entropy toward c within an RMS
budget rho; rho = 0.1, k = 5, S = 35, mu = 0 as in the reference). Several targets of one
image run as one batch, one row per distinct class. On a robust network the image shows
what the network needs to see for c; on a standard one it looks like noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from models.defaults import DEFAULT_TARGETS, EXPLAIN_MOMENTUM, EXPLAIN_OVERSHOOT, EXPLAIN_RHO, EXPLAIN_STEPS
from models.errors import BadParameterError
from models.explain.targets import rank_classes, resolve_targets
from models.nn.compiled import accelerate_default
from models.nn.runtime import eval_mode, model_device
from models.perturb.engine import ProgressFn, perturbation_search


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
            "predicted": {
                "class_index": self.predicted,
                "class_name": self.classes[self.predicted],
                "prob": float(self.probs[self.predicted]),
            },
            "runner_up": {
                "class_index": self.runner_up,
                "class_name": self.classes[self.runner_up],
                "prob": float(self.probs[self.runner_up]),
            },
            "probs": {c: float(p) for c, p in zip(self.classes, self.probs.tolist())},
            "settings": self.settings,
            "targets": [t.summary() for t in self.targets],
        }


class Explainer:
    """Adversarial explanations for one model with fixed search settings.

    model: classifier on N x C x H x W in [0, 1]. classes: names by index (default "0".."C-1").
    rho: budget (RMS). bound_check: raise BoundNotReachedError when a target does not reach
    rho within half the steps (the reference does). batch_size: rows per search batch.
    accelerate: search through a ``torch.compile``d copy of the model (``models.nn.compiled``;
    None: the ``AEX_COMPILE`` environment setting, off by default).
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
        accelerate: bool | None = None,
    ):
        if batch_size < 1:
            raise BadParameterError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.classes = list(classes) if classes is not None else None
        self.rho, self.steps, self.overshoot, self.momentum = rho, steps, overshoot, momentum
        self.clamp, self.bound_check, self.batch_size = clamp, bound_check, batch_size
        self.accelerate = accelerate_default() if accelerate is None else bool(accelerate)

    def explain(
        self,
        image: torch.Tensor,
        targets: Sequence[str | int] = DEFAULT_TARGETS,
        progress: ProgressFn | None = None,
    ) -> Explanation:
        """image: float C x H x W in [0, 1]. Returns an Explanation with one entry per target."""
        if image.ndim != 3 or not image.is_floating_point():
            raise BadParameterError(f"image must be a float C x H x W tensor, got {tuple(image.shape)} {image.dtype}")
        return self.explain_many(image.unsqueeze(0), [targets], progress)[0]

    def explain_many(
        self,
        images: torch.Tensor,
        targets: Sequence[Sequence[str | int]],
        progress: ProgressFn | None = None,
    ) -> list[Explanation]:
        """The explanations of several images (float N x C x H x W in [0, 1]), ``targets[i]``
        those of image i, with the rows of all images in one search (a worker's batch of
        explain jobs): each image's explanations are those it gets alone, up to float rounding
        (rows never interact)."""
        if images.ndim != 4 or not images.is_floating_point() or len(targets) != images.shape[0]:
            raise BadParameterError("images must be a float N x C x H x W batch with one target list each")
        device = model_device(self.model)
        xs = images.detach().to(device)
        with eval_mode(self.model), torch.no_grad():
            probs_all = self.model(xs).softmax(1).cpu()
        classes = self.classes or [str(i) for i in range(probs_all.shape[1])]
        if len(classes) != probs_all.shape[1]:
            raise BadParameterError(f"{len(classes)} class names for a model with {probs_all.shape[1]} outputs")
        wanted = [resolve_targets(t, probs, classes) for t, probs in zip(targets, probs_all)]
        # One row per distinct (image, class): the same target on the same image gives the same result.
        unique = list(dict.fromkeys((i, c) for i, w in enumerate(wanted) for _, c in w))
        rows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        chunks = [unique[i : i + self.batch_size] for i in range(0, len(unique), self.batch_size)]
        per_chunk = self.steps

        for k, chunk in enumerate(chunks):

            def chunk_progress(done: int, _total: int, k: int = k) -> None:
                if progress is not None:
                    progress(k * per_chunk + done, len(chunks) * per_chunk)

            res = perturbation_search(
                self.model,
                xs[[i for i, _ in chunk]],
                [c for _, c in chunk],
                mode="explain",
                steps=self.steps,
                eps=self.rho,
                overshoot=self.overshoot,
                momentum=self.momentum,
                clamp=self.clamp,
                bound_check=self.bound_check,
                progress=chunk_progress,
                accelerate=self.accelerate,
            )
            delta = res.delta.cpu()
            after = res.logits_after.softmax(1).cpu()
            for j, key in enumerate(chunk):
                rows[key] = (delta[j], after[j])
        return [self._explanation(xs[i].cpu(), probs_all[i], classes, wanted[i], rows, i) for i in range(len(wanted))]

    def _explanation(self, x_cpu, probs, classes, wanted, rows, i) -> Explanation:
        out = []
        for role, c in wanted:
            delta, after = rows[(i, c)]
            out.append(
                TargetExplanation(
                    role=role,
                    class_index=c,
                    class_name=classes[c],
                    image=x_cpu + delta,
                    delta=delta,
                    rms=float(delta.pow(2).mean().sqrt()),
                    probs_before=probs,
                    probs_after=after,
                )
            )
        order = rank_classes(probs)
        return Explanation(
            input=x_cpu,
            classes=classes,
            probs=probs,
            predicted=order[0],
            runner_up=order[1] if len(order) > 1 else order[0],
            targets=out,
            settings={
                "rho": self.rho,
                "steps": self.steps,
                "overshoot": self.overshoot,
                "momentum": self.momentum,
                "clamp": self.clamp,
                "bound_check": self.bound_check,
            },
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
