"""Faithfulness of a map: RISE deletion and insertion AUCs (Petsiuk et al. 2018) of the explained
class's probability, beside the same curves in a seeded random pixel order.

For an image x (C x H x W in [0, 1]), a map m (H x W, larger = more important), a class c and
K steps: order the H*W pixel positions by m, largest first (ties by position, a stable sort).
Step k (k = 0 ... K) affects the first floor(k H W / K) positions, every channel of each.
- deletion: those pixels of x are replaced by the baseline b's; p_k = softmax(f(.))[c]
- insertion: those pixels of b are replaced by x's (step 0 is b, step K is x)
- AUC = (1/K) sum_{k<K} (p_k + p_{k+1}) / 2, the trapezoid over the fraction of pixels, in [0, 1]
The baseline b is a blurred copy of x: a Gaussian of sigma = ``FAITHFULNESS_BLUR_SIGMA`` x the
longer side (4 px on 32 x 32), separable, reflect padding. The random order is one permutation
of the positions drawn from ``torch.Generator().manual_seed(seed)``, the same for every map of
a request, so a job stays deterministic. A faithful map has a deletion AUC below the random
order's (the class's probability falls faster when its pixels go first) and an insertion AUC
above it.

Every image of every curve (x and b once, then K - 1 intermediate steps per curve and order)
goes through the model in one batched forward pass (in chunks of ``batch`` rows; on the CPU
through its fused channels-last copy, ``models.nn.inference``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.defaults import FAITHFULNESS_BATCH, FAITHFULNESS_BLUR_SIGMA, FAITHFULNESS_SEED, FAITHFULNESS_STEPS
from models.errors import BadParameterError
from models.nn.inference import inference_copy
from models.nn.runtime import eval_mode, model_device


def delta_map(delta: torch.Tensor) -> torch.Tensor:
    """The map of an adversarial explanation: |delta| summed over channels.
    delta: C x H x W -> float H x W, >= 0."""
    return delta.detach().abs().sum(0).float()


def blurred(x: torch.Tensor, sigma_fraction: float = FAITHFULNESS_BLUR_SIGMA) -> torch.Tensor:
    """The baseline: x (C x H x W in [0, 1]) blurred by a Gaussian of sigma = ``sigma_fraction``
    x max(H, W) pixels (radius 3 sigma, cut to the image; reflect padding). Same shape, in [0, 1]."""
    c, h, w = x.shape
    sigma = sigma_fraction * max(h, w)
    if sigma <= 0:
        return x.clone()
    out = x.unsqueeze(0).float()
    for dim, size in ((2, h), (3, w)):
        radius = max(0, min(math.ceil(3 * sigma), size - 1))
        if radius == 0:
            continue
        r = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
        g = torch.exp(-(r**2) / (2 * sigma**2))
        g = (g / g.sum()).view(1, 1, -1, 1) if dim == 2 else (g / g.sum()).view(1, 1, 1, -1)
        pad = (0, 0, radius, radius) if dim == 2 else (radius, radius, 0, 0)
        out = F.conv2d(F.pad(out, pad, mode="reflect"), g.expand(c, 1, *g.shape[2:]), groups=c)
    return out[0].clamp(0.0, 1.0).to(x.dtype)


def pixel_order(saliency: torch.Tensor) -> torch.Tensor:
    """Positions of an H x W map, most important first (stable: ties keep their position
    order). Returns int64 H*W indices into the flattened map."""
    return torch.sort(saliency.detach().float().reshape(-1).cpu(), descending=True, stable=True).indices


def random_order(num_pixels: int, seed: int = FAITHFULNESS_SEED) -> torch.Tensor:
    """The seeded random order: ``randperm(num_pixels, Generator().manual_seed(seed))``."""
    return torch.randperm(num_pixels, generator=torch.Generator().manual_seed(int(seed)))


def step_counts(num_pixels: int, steps: int) -> list[int]:
    """Pixels affected at each step k = 0 ... K: floor(k num_pixels / K)."""
    return [k * num_pixels // steps for k in range(steps + 1)]


def curve_images(x: torch.Tensor, baseline: torch.Tensor, order: torch.Tensor, steps: int) -> torch.Tensor:
    """The intermediate images of both curves of one order: (2 (K - 1)) x C x H x W, the
    deletion steps k = 1 ... K - 1, then the insertion steps k = 1 ... K - 1 (steps 0 and K of
    both curves are x and the baseline themselves)."""
    c, h, w = x.shape
    counts = step_counts(h * w, steps)
    rank = torch.empty(h * w, dtype=torch.long)
    rank[order] = torch.arange(h * w)
    rank = rank.to(x.device).view(1, h, w)
    k = torch.tensor(counts[1:steps], device=x.device).view(-1, 1, 1)
    gone = (rank < k).unsqueeze(1)  # (K-1) x 1 x H x W: affected at step k
    deletion = torch.where(gone, baseline.unsqueeze(0), x.unsqueeze(0))
    insertion = torch.where(gone, x.unsqueeze(0), baseline.unsqueeze(0))
    return torch.cat([deletion, insertion])


def auc(probs: Sequence[float] | torch.Tensor) -> float:
    """Trapezoid area under p_0 ... p_K over [0, 1] in K equal steps."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    return float(((p[:-1] + p[1:]) / 2).mean())


def _forward_probs(model: nn.Module, batch: torch.Tensor, rows: int) -> torch.Tensor:
    # On the CPU through the fused channels-last copy (models.nn.inference: 0.65x the CPU time
    # at 32 rows; the same probabilities to float rounding).
    net = inference_copy(model) if batch.device.type == "cpu" else model
    with eval_mode(model), torch.no_grad():
        parts = [net(batch[i : i + rows]).float().softmax(1) for i in range(0, batch.shape[0], rows)]
    return torch.cat(parts).cpu()


def faithfulness(
    model: nn.Module,
    x: torch.Tensor,
    maps: Sequence[torch.Tensor],
    classes: Sequence[int],
    *,
    steps: int = FAITHFULNESS_STEPS,
    seed: int = FAITHFULNESS_SEED,
    blur_sigma: float = FAITHFULNESS_BLUR_SIGMA,
    batch: int = FAITHFULNESS_BATCH,
) -> list[dict[str, Any]]:
    """Deletion and insertion AUCs of each map, with the random order's beside them.

    x: float C x H x W in [0, 1]. maps: H x W tensors (any real values; larger = more
    important). classes: the explained class of each map. Returns one dict per map:
    "deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc" (in [0, 1]),
    "deletion_curve", "insertion_curve", "random_deletion_curve", "random_insertion_curve"
    (K + 1 probabilities each) and "class_index". The random curves depend on the class only.
    """
    if x.ndim != 3 or not x.is_floating_point():
        raise BadParameterError(f"x must be a float C x H x W image, got {tuple(x.shape)} {x.dtype}")
    if len(maps) != len(classes):
        raise BadParameterError(f"need one class per map: {len(maps)} maps, {len(classes)} classes")
    if steps < 1 or steps > x.shape[1] * x.shape[2]:
        raise BadParameterError(f"steps must be in [1, H x W], got {steps}")
    for m in maps:
        if tuple(m.shape) != tuple(x.shape[1:]):
            raise BadParameterError(f"a map must be H x W = {tuple(x.shape[1:])}, got {tuple(m.shape)}")
    device = model_device(model)
    x = x.detach().to(device).float()
    b = blurred(x, blur_sigma)
    orders = [random_order(x.shape[1] * x.shape[2], seed)] + [pixel_order(m) for m in maps]
    batch_images = torch.cat([x.unsqueeze(0), b.unsqueeze(0)] + [curve_images(x, b, o, steps) for o in orders])
    if device.type == "cpu":
        batch_images = batch_images.contiguous(memory_format=torch.channels_last)
    probs = _forward_probs(model, batch_images, max(1, int(batch)))
    p_x, p_b, per = probs[0], probs[1], 2 * (steps - 1)

    def curves(j: int, c: int) -> tuple[list[float], list[float]]:
        inner = probs[2 + j * per : 2 + (j + 1) * per, c]
        deletion = [float(p_x[c]), *inner[: steps - 1].tolist(), float(p_b[c])]
        insertion = [float(p_b[c]), *inner[steps - 1 :].tolist(), float(p_x[c])]
        return deletion, insertion

    out = []
    for j, c in enumerate(classes, start=1):
        c = int(c)
        deletion, insertion = curves(j, c)
        random_deletion, random_insertion = curves(0, c)
        out.append(
            {
                "class_index": c,
                "deletion_auc": auc(deletion),
                "insertion_auc": auc(insertion),
                "random_deletion_auc": auc(random_deletion),
                "random_insertion_auc": auc(random_insertion),
                "deletion_curve": deletion,
                "insertion_curve": insertion,
                "random_deletion_curve": random_deletion,
                "random_insertion_curve": random_insertion,
            }
        )
    return out


def faithfulness_method(
    steps: int = FAITHFULNESS_STEPS, seed: int = FAITHFULNESS_SEED, blur_sigma: float = FAITHFULNESS_BLUR_SIGMA
) -> dict[str, Any]:
    """The exact definition and parameters of the figures, as a result's provenance states them."""
    return {
        "protocol": "RISE deletion and insertion (Petsiuk et al. 2018)",
        "steps": int(steps),
        "order": "pixel positions by the map, largest first (stable sort); every channel of a pixel together",
        "pixels_at_step": "floor(k * H * W / steps), k = 0 ... steps",
        "deletion": "pixels of the input replaced by the baseline's, in the map's order",
        "insertion": "pixels of the baseline replaced by the input's, in the map's order",
        "baseline": f"the input blurred by a Gaussian of sigma = {blur_sigma} x its longer side, reflect padding",
        "score": "softmax probability of the explained class",
        "auc": "trapezoid over the fraction of pixels in [0, 1], mean of (p_k + p_k+1) / 2",
        "random_order": f"torch.randperm(H * W, generator=torch.Generator().manual_seed({int(seed)}))",
        "gradcam_map": "the Grad-CAM map of the predicted class",
        "explanation_map": "|delta| summed over channels, explained class = the explanation's target",
        "reading": "deletion below random and insertion above random: the map shows what the decision rests on",
    }
