"""The randomisation sanity check of the maps (Adebayo et al. 2018): how much Grad-CAM and the
adversarial explanations change when the network's weights are randomised, layer by layer from
the logits down.

For images x_i (the first n of the seeded subset) and the trained network's decision c_i, the
maps of the trained network are compared with the maps of copies whose top layers are
re-initialised as at the start of training (each layer's own ``reset_parameters``:
Kaiming-uniform convolutions and linear layers, BatchNorm back to weight 1, bias 0 and fresh
running statistics), in a cascade: the output layer alone, then the top quarter, half and all
of the layers (``SANITY_STAGES``; layers = modules that hold parameters, in registration order,
which for aex's networks is the forward order). Each layer's random weights come from seed +
its index, so a run repeats. The maps of one class c_i at every stage: Grad-CAM (float H x W
in [0, 1]) and |delta| summed over channels of the explanation toward c_i (rho, steps of the
explain defaults, no bound check: a random network need not reach rho). Figures per stage: the
mean (and standard deviation) over images of the Spearman rank correlation and of SSIM (maps
scaled to [0, 1]) between the trained and the randomised network's maps. A map that follows the
network drops toward 0; one that stays high shows the image, not the network.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.defaults import (
    EXPLAIN_RHO,
    EXPLAIN_STEPS,
    SANITY_FOLLOWS_BELOW,
    SANITY_SEED,
    SANITY_STAGES,
)
from models.explain.adversarial import Explainer
from models.explain.faithfulness import delta_map
from models.explain.gradcam import gradcam, layer_name, resolve_layer
from models.explain.similarity import normalise, spearman, ssim
from models.nn.runtime import eval_mode

METHODS = ("gradcam", "adversarial")


def parametrised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that holds parameters itself, in registration order."""
    return [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def randomise(module: nn.Module, seed: int) -> None:
    """Re-initialise one layer as at the start of training, from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            with torch.no_grad():
                for p in module.parameters(recurse=False):
                    p.normal_(0.0, 0.05)


def _maps(model: nn.Module, x: torch.Tensor, cls: torch.Tensor, layer: str, rho: float, steps: int):
    cams = gradcam(model, x, cls, layer=layer).cpu()
    explainer = Explainer(model, rho=rho, steps=steps, bound_check=False)
    aes = torch.stack([delta_map(explainer.explain(xi, [int(c)]).targets[0].delta) for xi, c in zip(x, cls.tolist())])
    return {"gradcam": cams, "adversarial": aes}


def _stats(values: Sequence[float]) -> dict[str, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False))}


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, dict[str, float]]:
    """Spearman and SSIM of N x H x W maps, image by image: {"spearman": {mean, std}, "ssim": ...}."""
    rs = [spearman(a, b) for a, b in zip(reference, other)]
    ss = [ssim(normalise(a), normalise(b)) for a, b in zip(reference, other)]
    return {"spearman": _stats(rs), "ssim": _stats(ss)}


def sanity_check(
    model: nn.Module,
    images: torch.Tensor,
    *,
    layer: str | None = None,
    stages: Sequence[float] = SANITY_STAGES,
    seed: int = SANITY_SEED,
    rho: float = EXPLAIN_RHO,
    steps: int = EXPLAIN_STEPS,
) -> dict[str, Any]:
    """The cascading randomisation check on ``images`` (uint8 N x C x H x W or float in [0, 1]).

    Returns {"stages": [{"fraction", "randomised", "of", "down_to", "gradcam": {"spearman":
    {mean, std}, "ssim": {...}}, "adversarial": {...}}, ...], "follows_weights": {method: bool:
    the fully randomised stage's mean Spearman < SANITY_FOLLOWS_BELOW}, "verdict": one sentence per
    method, "settings": {...}, "n", "seconds"}. The model is not changed (copies are randomised)."""
    t0 = time.perf_counter()
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    target = layer_name(model, resolve_layer(model, layer))
    with eval_mode(model), torch.no_grad():
        cls = model(x).argmax(1).cpu()
    reference = _maps(model, x, cls, target, rho, steps)
    net = copy.deepcopy(model).eval()
    layers = parametrised_layers(net)
    done = 0
    out_stages = []
    for fraction in stages:
        k = min(len(layers), max(1, math.ceil(float(fraction) * len(layers))))
        for i in range(len(layers) - k, len(layers) - done):
            randomise(layers[i][1], seed + i)
        done = max(done, k)
        maps = _maps(net, x, cls, target, rho, steps)
        stage = {"fraction": float(fraction), "randomised": k, "of": len(layers), "down_to": layers[-k][0]}
        stage.update({m: compare(reference[m], maps[m]) for m in METHODS})
        out_stages.append(stage)
    last = out_stages[-1]
    follows = {m: last[m]["spearman"]["mean"] < SANITY_FOLLOWS_BELOW for m in METHODS}
    names = {"gradcam": "Grad-CAM", "adversarial": "the adversarial explanations"}
    verdict = {
        m: (
            f"randomising {last['randomised']} of {last['of']} layers moves the Spearman correlation of "
            f"{names[m]} with the trained network's to {last[m]['spearman']['mean']:.3f} "
            f"(SSIM {last[m]['ssim']['mean']:.3f}): "
            + ("they follow the weights" if follows[m] else "they barely depend on the weights")
        )
        for m in METHODS
    }
    return {
        "n": int(x.shape[0]),
        "stages": out_stages,
        "follows_weights": follows,
        "verdict": verdict,
        "settings": {
            "weights_seed": int(seed),
            "stages": [float(s) for s in stages],
            "layer": target,
            "rho": float(rho),
            "steps": int(steps),
            "classes": "the trained network's decision on each image, at every stage",
            "maps": {"gradcam": "Grad-CAM, [0, 1]", "adversarial": "|delta| summed over channels"},
            "ssim": "Gaussian 11 x 11 window, sigma 1.5, K1 0.01, K2 0.03, maps min-max scaled to [0, 1]",
            "follows_below": SANITY_FOLLOWS_BELOW,
            "randomisation": "cascading from the output layer, each layer's reset_parameters",
        },
        "seconds": time.perf_counter() - t0,
    }
