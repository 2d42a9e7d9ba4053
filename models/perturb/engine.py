"""The one perturbation search behind attacks, ARA, adversarial training and explanations.

It follows ALGORITHMS.md "The perturbation search" (the reference code's ``_adv_images``):
start with delta = 0 and, for t = 0 .. S-1, evaluate ``f(x + delta)``, take the gradient
``g`` of the summed cross-entropy with respect to delta, decide per sample whether to keep
following the loss (``follow = 1``) or pull delta back towards 0 (``follow = 0``), and move
by ``s_t = eps * k * (S - t) / (S (S + 1) / 2)`` along the unit-RMS direction
``follow * g + (1 - follow) * (-delta)`` (optionally smoothed by momentum).

Modes (what ``follow = 1`` means):

- ``bounded``: rms(delta) < eps (a plain L2 attack; adversarial training);
- ``l2min``: the sample is still classified as y (attack ARA; "L2,min" training);
- ``btr``: softmax(logits)[y] > 1/C, still better than random (BTR ARA);
- ``explain``: rms(delta) < eps, with g negated so the search descends toward class y.

``l2min`` and ``btr`` evaluate once more at t = S and return, per sample, the delta of
smallest RMS seen with ``follow = 0`` (zero when there is none). ``bounded`` and ``explain``
return the last delta. Everything is measured in pixel space (the model normalises inside
``forward``); images are float N x C x H x W in [0, 1].

Beyond the reference: rows that cannot move are dropped from the batch (rows with
``affected = 0``, and in ``l2min``/``btr`` rows already wrong at delta = 0, whose direction
``-delta`` is zero so they would stay at 0 for ever); the result is identical because the
model runs in eval mode, where rows do not interact. ``clamp=True`` projects x + delta onto
[0, 1] after every step; the default (off) is the reference behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import BadParameterError, BoundNotReachedError
from models.nn.compiled import search_network
from models.nn.layout import small_batch_layout
from models.nn.runtime import eval_mode, model_device

MODES = ("bounded", "l2min", "btr", "explain")
ProgressFn = Callable[[int, int], None]


@dataclass
class SearchResult:
    """What a search returns; every tensor is on the model's device.

    delta: N x C x H x W perturbation (x + delta is what the model saw).
    rms: N, sqrt(mean(delta^2)) over C*H*W.
    found: N bool, some evaluation had ``follow == 0`` (budget reached, class flipped, ...).
    first_ok_step: N int64, the first evaluation t with ``follow == 0``; -1 if never.
    logits_before: N x num_classes at delta = 0.
    logits_after: N x num_classes at x + delta (None when not asked for).
    saturated: N bool (explain mode): the target's probability rounded to 1 while the search
        still followed the gradient, so the loss had nothing left to give and delta stopped
        growing short of the budget; such samples are exempt from the bound check.
    """

    delta: torch.Tensor
    rms: torch.Tensor
    found: torch.Tensor
    first_ok_step: torch.Tensor
    logits_before: torch.Tensor
    logits_after: torch.Tensor | None
    saturated: torch.Tensor


def rms(delta: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS over all but the first dimension: N x ... -> N."""
    return delta.pow(2).flatten(1).mean(1).sqrt()


def step_size(t: int, steps: int, eps: float, overshoot: float) -> float:
    """Linearly decaying step t of S; the S steps sum to eps * overshoot."""
    return eps * overshoot * (steps - t) / (steps * (steps + 1) / 2)


def _follow(mode: str, logits: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample bool: keep following the loss gradient (True) or pull delta back."""
    if mode in ("bounded", "explain"):
        # mean(delta^2) < eps^2 is rms < eps without the square root (as the reference).
        return delta.detach().pow(2).flatten(1).mean(1) < eps * eps
    if mode == "l2min":
        return logits.argmax(1) == y
    # btr
    p_y = logits.softmax(1).gather(1, y.unsqueeze(1))[:, 0]
    return p_y > 1.0 / logits.shape[1]


def _validate(mode: str, steps: int, eps: float, overshoot: float, momentum: float) -> None:
    if mode not in MODES:
        raise BadParameterError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if int(steps) != steps or steps < 1:
        raise BadParameterError(f"steps must be a positive integer, got {steps}")
    if not eps > 0:
        raise BadParameterError(f"eps must be > 0, got {eps}")
    if not overshoot > 0:
        raise BadParameterError(f"overshoot must be > 0, got {overshoot}")
    if not 0 <= momentum < 1:
        raise BadParameterError(f"momentum must be in [0, 1), got {momentum}")


def _as_affected(affected, n: int, device: torch.device) -> torch.Tensor:
    if affected is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    a = torch.as_tensor(affected, device=device).reshape(-1)
    if a.numel() != n:
        raise BadParameterError(f"affected needs one entry per sample ({n}), got {a.numel()}")
    return a != 0


def perturbation_search(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | Sequence[int],
    *,
    mode: str,
    steps: int,
    eps: float,
    overshoot: float = 1.0,
    momentum: float = 0.0,
    affected: torch.Tensor | Sequence[float] | None = None,
    clamp: bool = False,
    bound_check: bool = True,
    with_logits_after: bool = True,
    progress: ProgressFn | None = None,
    accelerate: bool = False,
) -> SearchResult:
    """Run the search on a batch.

    Args:
        model: classifier taking N x C x H x W in [0, 1]; runs in eval mode during the
            search (each submodule's mode is restored afterwards); its parameters get no
            gradients (only d loss / d delta is computed).
        x: float N x C x H x W in [0, 1], any device (moved to the model's).
        y: N class indices: the true class (bounded, l2min, btr) or the target (explain).
        mode: "bounded", "l2min", "btr" or "explain".
        steps: S. eps: the budget, an RMS (for l2min/btr only the step scale).
        overshoot: k; the steps sum to eps * k. momentum: mu in [0, 1).
        affected: N mask, nonzero = perturb this sample (others keep delta = 0 and are not
            part of the bound check). None = all.
        clamp: keep x + delta in [0, 1] by projection after every step (off = reference).
        bound_check: raise BoundNotReachedError if any affected sample first has
            ``follow == 0`` only after step S // 2, or never (off for adversarial training).
        with_logits_after: also return the logits at x + delta (one extra forward for
            bounded/explain; free for l2min/btr).
        progress: called as progress(evaluations_done, evaluations_total).
        accelerate: run the network through ``models.nn.compiled.search_network`` (a
            ``torch.compile``d frozen copy; eager where compiling is impossible). For
            bounded and explain mode only: it rounds differently, and l2min/btr give the
            ARA's radii, which must not move.
    """
    _validate(mode, steps, eps, overshoot, momentum)
    if x.ndim != 4:
        raise BadParameterError(f"x must be N x C x H x W, got shape {tuple(x.shape)}")
    device = model_device(model)
    if not x.is_floating_point():
        raise BadParameterError(f"x must be a float tensor in [0, 1], got {x.dtype}")
    x = x.detach().to(device)
    n = x.shape[0]
    y = torch.as_tensor(y, dtype=torch.long, device=device).reshape(-1)
    if y.numel() != n:
        raise BadParameterError(f"y needs one class per sample ({n}), got {y.numel()}")
    affected_mask = _as_affected(affected, n, device)
    tracks_best = mode in ("l2min", "btr")
    total = steps + (1 if tracks_best else 0)
    never = steps + 999  # "not yet": larger than any step, as in the reference

    net = model
    if accelerate and mode in ("bounded", "explain") and n:
        net = search_network(model, x)
    elif mode == "explain":
        # An explanation's few rows: the NHWC copy on the CPU (models.nn.layout).
        net, x = small_batch_layout(model, x)
    with eval_mode(model), torch.enable_grad():
        # Evaluation t = 0 on the whole batch: it gives logits_before and tells which rows
        # can be dropped.
        delta0 = torch.zeros_like(x, requires_grad=True)
        logits0 = net(x + delta0)
        num_classes = logits0.shape[1]
        if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise BadParameterError(f"class indices must be in [0, {num_classes}), got {y.tolist()}")
        follow0 = _follow(mode, logits0, y, delta0, eps)
        logits_before = logits0.detach()

        delta_out = torch.zeros_like(x)
        first_ok = torch.where(follow0, never, 0)
        saturated = torch.zeros(n, dtype=torch.bool, device=device)
        logits_after = logits_before.clone() if with_logits_after else None
        # Rows that never move: not affected, or (l2min/btr) already on the far side of the
        # bound at delta = 0, where the direction -delta is zero.
        active = affected_mask & follow0 if tracks_best else affected_mask
        idx = active.nonzero().squeeze(1)

        if idx.numel():
            g0 = torch.autograd.grad(F.cross_entropy(logits0, y, reduction="sum"), delta0)[0]
            delta_a, first_a, logits_a, saturated_a = _search_rows(
                net,
                x[idx],
                y[idx],
                g0[idx],
                logits_before[idx],
                follow0[idx],
                mode=mode,
                steps=steps,
                eps=eps,
                overshoot=overshoot,
                momentum=momentum,
                clamp=clamp,
                with_logits_after=with_logits_after,
                progress=progress,
                never=never,
            )
            delta_out[idx] = delta_a
            first_ok[idx] = first_a
            saturated[idx] = saturated_a
            if with_logits_after:
                logits_after[idx] = logits_a
        elif progress is not None:
            progress(total, total)
        del logits0, delta0

    if bound_check:
        late = affected_mask & (first_ok > steps // 2) & ~saturated
        if bool(late.any()):
            what = {
                "bounded": f"reach the budget rms {eps}",
                "explain": f"reach the budget rms {eps}",
                "l2min": "be misclassified",
                "btr": "fall to chance probability",
            }[mode]
            raise BoundNotReachedError(
                f"{int(late.sum())} of {int(affected_mask.sum())} samples did not {what} within "
                f"the first half of the {mode} search (step {steps // 2} of {steps}), so the "
                f"result would not be a representative bound; increase "
                f"{'rho' if mode == 'explain' else 'eps'} (now {eps}) or steps (now {steps})"
            )

    found = first_ok < never
    return SearchResult(
        delta=delta_out,
        rms=rms(delta_out),
        found=found,
        first_ok_step=torch.where(found, first_ok, -1),
        logits_before=logits_before,
        logits_after=logits_after,
        saturated=saturated,
    )


def _search_rows(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    g0: torch.Tensor,
    logits0: torch.Tensor,
    follow0: torch.Tensor,
    *,
    mode: str,
    steps: int,
    eps: float,
    overshoot: float,
    momentum: float,
    clamp: bool,
    with_logits_after: bool,
    progress: ProgressFn | None,
    never: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The loop over the rows that move; evaluation t = 0 (g0, logits0, follow0) is done.

    Returns (delta, first_ok_step with ``never`` for none, logits at x + delta or None,
    saturated: explain rows whose target probability rounded to 1 while still following).
    """
    tracks_best = mode in ("l2min", "btr")
    total = steps + (1 if tracks_best else 0)
    m = x.shape[0]
    delta = torch.zeros_like(x, requires_grad=True)
    mom = torch.zeros_like(x) if momentum > 0 else None
    first_ok = torch.full((m,), never, dtype=torch.long, device=x.device)
    saturated = torch.zeros(m, dtype=torch.bool, device=x.device)
    if tracks_best:
        # Zero delta (and its logits) stand for "nothing found", as in the reference.
        best_delta = torch.zeros_like(x)
        best_sq = torch.full((m,), float("inf"), dtype=x.dtype, device=x.device)
        best_logits = logits0.clone() if with_logits_after else None
    g, logits, follow = g0, logits0, follow0

    for t in range(total):
        if t == steps:
            # The extra evaluation of l2min/btr: no step follows, so no gradient is needed.
            with torch.no_grad():
                logits = model(x + delta)
            follow = _follow(mode, logits, y, delta, eps)
        elif t > 0:
            out = model(x + delta)
            g = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), delta)[0]
            logits = out.detach()
            follow = _follow(mode, logits, y, delta, eps)
        reached = ~follow
        first_ok = torch.where(reached & (first_ok > t), t, first_ok)
        if mode == "explain":
            # A network already certain of the target (a standard one often is) gives a
            # cross-entropy gradient that vanishes in float: delta cannot grow to the budget,
            # and no larger rho or more steps would change that.
            certain = logits.softmax(1).gather(1, y.unsqueeze(1))[:, 0] >= 1.0
            saturated |= follow & certain

        if tracks_best:
            sq = delta.detach().pow(2).flatten(1).mean(1)
            better = reached & (sq < best_sq)
            if bool(better.any()):
                best_delta[better] = delta.detach()[better]
                best_sq = torch.where(better, sq, best_sq)
                if best_logits is not None:
                    best_logits[better] = logits[better]
            if t == steps:
                if progress is not None:
                    progress(t + 1, total)
                break

        with torch.no_grad():
            if mode == "explain":
                g = -g  # descend toward the target class
            f = follow.to(x.dtype).view(-1, 1, 1, 1)
            d = f * g + (1 - f) * (-delta)
            d = d / (1e-8 + rms(d).view(-1, 1, 1, 1))
            if mom is not None:
                mom.mul_(momentum).add_(d, alpha=1 - momentum)
                d = mom
            delta.add_(d, alpha=step_size(t, steps, eps, overshoot))
            if clamp:
                delta.copy_((x + delta).clamp_(0.0, 1.0).sub_(x))
        if progress is not None:
            progress(t + 1, total)

    if tracks_best:
        return best_delta, first_ok, best_logits, saturated
    delta = delta.detach()
    out_logits = None
    if with_logits_after:
        with torch.no_grad():
            out_logits = model(x + delta)
    return delta, first_ok, out_logits, saturated
