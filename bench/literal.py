"""The baselines of bench/bench_all.py: ALGORITHMS.md transcribed literally, in plain torch.

Nothing here is used by the project; it exists so that the engine's speed can be stated as a
ratio against the algorithm written down the obvious way and run in the same process on the
same images. What "literal" means here:

- the search: every row of the batch at every step (no rows dropped, not even those already
  past the bound at delta = 0), one forward and one input-gradient backward per evaluation
  (the extra evaluation of l2min/btr included), the follow rule, step size, direction and
  momentum exactly as ALGORITHMS.md states them; the network is called as ``model(x + delta)``
  in its ordinary state (parameters requiring grad, contiguous NCHW, no compilation). The
  float operations are written in the order the engine performs them (``m = mu*m + (1-mu)*d``
  as an in-place ``mul_``/``add_``), so that equal radii can be demanded to 1e-4 and not
  just "within float noise" of a search that amplifies rounding differences;
- explanations: one row per requested target (12 for predicted + runner-up + 10 classes),
  a forward for the probabilities before and one after;
- the robust training step: ALGORITHMS.md "Training with the Lipschitz-inspired penalty"
  (cross-entropy, the per-sample scalar, G by double back-propagation, psi * mean(|G|^z),
  one SGD step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def literal_search(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: str,
    steps: int,
    eps: float,
    overshoot: float = 1.0,
    momentum: float = 0.0,
) -> torch.Tensor:
    """ALGORITHMS.md "The perturbation search": the returned delta (best delta for
    l2min/btr, zero where none was found; the last delta otherwise)."""
    n = x.shape[0]
    tracks_best = mode in ("l2min", "btr")
    delta = torch.zeros_like(x, requires_grad=True)
    m = torch.zeros_like(x)
    best = torch.zeros_like(x)
    best_sq = torch.full((n,), float("inf"), device=x.device)
    for t in range(steps + (1 if tracks_best else 0)):
        logits = model(x + delta)
        loss = F.cross_entropy(logits, y, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), delta)
        sq = delta.detach().pow(2).flatten(1).mean(1)
        if mode in ("bounded", "explain"):
            follow = sq < eps * eps
        elif mode == "l2min":
            follow = logits.argmax(1) == y
        else:
            follow = logits.softmax(1).gather(1, y[:, None])[:, 0] > 1.0 / logits.shape[1]
        if tracks_best:
            better = ~follow & (sq < best_sq)
            best[better] = delta.detach()[better]
            best_sq = torch.where(better, sq, best_sq)
            if t == steps:
                break
        if mode == "explain":
            g = -g
        s = eps * overshoot * (steps - t) / (steps * (steps + 1) / 2)
        with torch.no_grad():
            f = follow.to(x.dtype).view(-1, 1, 1, 1)
            d = f * g + (1 - f) * (-delta)
            d = d / (1e-8 + d.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1))
            if momentum > 0:
                m.mul_(momentum).add_(d, alpha=1 - momentum)
                d = m
            delta.add_(d, alpha=s)
    return best if tracks_best else delta.detach()


def literal_explanation(model: nn.Module, image: torch.Tensor, rho: float, steps: int, overshoot: float):
    """12 rows (predicted, runner-up, each class) of explain mode on one image; returns
    (targets, delta, probabilities after)."""
    with torch.no_grad():
        probs = model(image[None]).softmax(1)[0]
    order = probs.argsort(descending=True).tolist()
    targets = [order[0], order[1], *range(probs.numel())]
    x = image[None].expand(len(targets), -1, -1, -1)
    y = torch.tensor(targets, device=image.device)
    delta = literal_search(model, x, y, "explain", steps, rho, overshoot, 0.0)
    with torch.no_grad():
        after = model(x + delta).softmax(1)
    return targets, delta, after


def literal_ara_radii(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    eps: float,
    overshoot: float,
    momentum: float,
) -> dict[str, torch.Tensor]:
    """Attack (l2min) and BTR radii of a batch, rms of the returned delta (0 where wrong)."""
    out = {}
    for name, mode in (("attack", "l2min"), ("btr", "btr")):
        d = literal_search(model, images, labels, mode, steps, eps, overshoot, momentum)
        out[name] = d.pow(2).flatten(1).mean(1).sqrt()
    return out


def literal_robust_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    psi: float,
    zeta: float,
    z: float,
    generator: torch.Generator,
) -> float:
    """One robust training step as ALGORITHMS.md states it; returns the loss."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    n, c = logits.shape
    random_class = torch.randint(0, c, (n,), generator=generator).to(x.device)
    tandem = (torch.rand(n, generator=generator) < zeta).to(x.device)
    fair = logits.gather(1, random_class[:, None])[:, 0]
    true_logit = logits.gather(1, y[:, None])[:, 0]
    others = logits.masked_fill(F.one_hot(y, c).bool(), float("-inf"))
    s = torch.where(tandem, true_logit - others.max(1).values, fair)
    (grad,) = torch.autograd.grad(s.sum(), x, create_graph=True)
    loss = ce + psi * grad.abs().pow(z).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())
