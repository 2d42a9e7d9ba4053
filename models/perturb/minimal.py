"""The two minimal radii of the stability score: exactly (the ARA's 450-step searches) or fast.

For an image x and a class y, the l2min search (attack ARA's) finds the smallest rms
perturbation that changes the decision, and the btr search (BTR ARA's) the smallest that
makes p_y no better than chance (1/C). ``mode="exact"`` runs ALGORITHMS.md's search with the
ARA settings (S, eps, k, mu), one search after the other, exactly as ``compute_ara`` does, so
a test image gets the very radius the ARA evaluation gives it.

``mode="fast"`` estimates the same two radii in a ninth of the evaluations. The exact search
takes large steps (the first is eps*k*2/(S+1), 0.089 rms with the ARA settings) that decay
linearly to zero over S steps and returns the smallest perturbation seen on the far side of
the bound. It crosses the bound within its first few steps and then oscillates across it; a
radius r is settled once the steps have shrunk to about r, which the linear schedule reaches
late for small radii (step 425 of 450 for r = 0.005). The fast search keeps the opening and
replaces the long decay by a short one scaled to each image's own radius:

1. rows: one per (image, search), all searches of all images in one batch; rows already on
   the far side of the bound at delta = 0 get radius 0 and no search, as in the exact search.
   With two classes the two criteria coincide (p_y > 1/2 exactly when y is the argmax, up to
   exact ties), so one row serves both searches.
2. opening: the first ``opening`` (40) steps of the exact search: same update rule, momentum
   and step sizes, so the same first crossings of the bound.
3. settling: the momentum restarts from zero, and ``settle`` (60) more steps follow with the
   same rule, but step u of row i is ``R_i * s_u``, where s_u is the exact schedule's linear
   decay over ``settle`` steps with ``eps * k = scale * settle`` (so s_0 = 2 * scale * settle /
   (settle + 1), about 1 for scale 0.5, decaying to 0), and R_i is the row's best radius so far
   (re-read at every step, so the steps shrink as better crossings are found; the current rms,
   at least 1e-3, while none has been found).
4. one last evaluation; the result is, as in the exact search, the smallest-rms delta seen on
   the far side of the bound (radius 0, ``found`` False, where there is none).

So 101 evaluations on a batch of (images x searches) rows instead of 2 x 451 evaluations.
Agreement with the exact search on the bundled checkpoints' recorded radii is measured by
``bench/bench_all.py`` (and tested on a subset); the exact search is itself sensitive to the
rounding of floats on some images (a perturbation of 1e-7 of the input moves a few radii of
100 by more than 15%), which bounds what any approximation of it can reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.defaults import (
    ARA_EPS,
    ARA_MOMENTUM,
    ARA_OVERSHOOT,
    ARA_STEPS,
    STABILITY_FAST_OPENING,
    STABILITY_FAST_REFINE,
    STABILITY_FAST_SCALE,
    STABILITY_FAST_SETTLE,
    StabilityMode,
)
from models.errors import BadParameterError
from models.nn.compiled import accelerate_default, search_network
from models.nn.layout import small_batch_layout
from models.nn.runtime import eval_mode, model_device
from models.perturb.ara import SEARCHES
from models.perturb.engine import ProgressFn, perturbation_search, step_size

RADIUS_MODES = tuple(mode.value for mode in StabilityMode)


@dataclass
class FastSettings:
    """The fast search's own parameters (besides the ARA settings it approximates)."""

    opening: int = STABILITY_FAST_OPENING
    settle: int = STABILITY_FAST_SETTLE
    scale: float = STABILITY_FAST_SCALE
    refine: int = STABILITY_FAST_REFINE

    def as_dict(self) -> dict:
        return {"opening": self.opening, "settle": self.settle, "scale": self.scale, "refine": self.refine}


@dataclass
class Radii:
    """rms: search name -> N float64 radii (0 where nothing was found or the row was already
    past the bound); found: name -> N bool; evaluations: the batched forward evaluations run
    (a fast search's rows stop at different steps, so this counts the longest)."""

    rms: dict[str, torch.Tensor]
    found: dict[str, torch.Tensor]
    mode: str
    evaluations: int
    settings: dict = field(default_factory=dict)


def fast_applies(steps: int, fast: FastSettings) -> bool:
    """Whether the fast search stands in for the exact one of ``steps`` steps: only for the
    ARA's own S (450), where its agreement is measured (``aex evaluate --stability``); its
    opening follows that schedule. Any other S runs the exact search."""
    return int(steps) == ARA_STEPS and int(steps) > fast.opening + fast.settle


def minimal_radii(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | Sequence[int],
    *,
    mode: str = "fast",
    searches: Sequence[str] = tuple(SEARCHES),
    steps: int = ARA_STEPS,
    eps: float = ARA_EPS,
    overshoot: float = ARA_OVERSHOOT,
    momentum: float = ARA_MOMENTUM,
    fast: FastSettings | None = None,
    progress: ProgressFn | None = None,
    accelerate: bool | None = None,
) -> Radii:
    """The radii of ``searches`` (names of ``SEARCHES``) for each image of x (float N x C x H x W
    in [0, 1]) at class y (N). ``mode``: "exact" (ALGORITHMS.md, the ARA's figures) or "fast"
    (module docstring); "fast" runs the exact search when ``steps`` is too small for it to
    save anything (the returned ``mode`` says which ran). ``progress(done, total)`` counts
    evaluations of the search that runs. accelerate: the fast search runs the network through
    a ``torch.compile``d copy (``models.nn.compiled``; None: the ``AEX_COMPILE`` setting, off
    by default); the exact search never does."""
    if mode not in RADIUS_MODES:
        raise BadParameterError(f"mode must be one of {', '.join(RADIUS_MODES)}, got {mode!r}")
    unknown = [s for s in searches if s not in SEARCHES]
    if unknown or not searches:
        raise BadParameterError(f"searches must be among {', '.join(SEARCHES)}, got {list(searches)}")
    fast = fast or FastSettings()
    if fast.opening < 0 or fast.settle < 1 or not fast.scale > 0:
        raise BadParameterError(f"bad fast search settings {fast.as_dict()}")
    settings = {"steps": int(steps), "eps": eps, "overshoot": overshoot, "momentum": momentum}
    if mode == "exact" or not fast_applies(steps, fast):
        return _exact(model, x, y, searches, settings, progress)
    accelerate = accelerate_default() if accelerate is None else accelerate
    return _fast(model, x, y, searches, settings, fast, progress, accelerate)


def _exact(model, x, y, searches, settings, progress) -> Radii:
    total = len(searches) * (settings["steps"] + 1)
    rms, found = {}, {}
    for k, name in enumerate(searches):

        def report(done: int, _total: int, offset: int = k * (settings["steps"] + 1)) -> None:
            if progress is not None:
                progress(offset + done, total)

        res = perturbation_search(
            model,
            x,
            y,
            mode=SEARCHES[name],
            bound_check=False,
            with_logits_after=False,
            progress=report,
            **settings,
        )
        rms[name] = res.rms.double().cpu()
        found[name] = res.found.cpu()
    return Radii(rms, found, "exact", total, {"mode": "exact", **settings, "clamp": False})


def _fast(model, x, y, searches, settings, fast: FastSettings, progress, accelerate: bool) -> Radii:
    if x.ndim != 4 or not x.is_floating_point():
        raise BadParameterError(f"x must be a float N x C x H x W batch, got {tuple(x.shape)} {x.dtype}")
    device = model_device(model)
    x = x.detach().to(device)
    n = x.shape[0]
    y = torch.as_tensor(y, dtype=torch.long, device=device).reshape(-1)
    if y.numel() != n:
        raise BadParameterError(f"y needs one class per image ({n}), got {y.numel()}")
    steps, eps, overshoot, momentum = settings["steps"], settings["eps"], settings["overshoot"], settings["momentum"]
    total = fast.opening + fast.settle + 1
    rms = {name: torch.zeros(n, dtype=torch.float64) for name in searches}
    found = {name: torch.zeros(n, dtype=torch.bool) for name in searches}

    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            logits0 = model(x)
        num_classes = logits0.shape[1]
        if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise BadParameterError(f"class indices must be in [0, {num_classes}), got {y.tolist()}")
        # Rows: (image, criterion); with two classes l2min and btr are one criterion.
        criteria = list(dict.fromkeys("l2min" if num_classes == 2 else SEARCHES[s] for s in searches))
        img = torch.arange(n, device=device).repeat(len(criteria))
        btr = torch.tensor([c == "btr" for c in criteria], device=device).repeat_interleave(n)
        follow0 = _follow(logits0[img], y[img], btr)
        rows = follow0.nonzero().squeeze(1)  # rows past the bound at delta = 0 keep radius 0
        # Few rows for a hundred steps: the compiled copy when asked for, else the NHWC copy on
        # the CPU (models.nn.layout).
        xr = x[img[rows]]
        net, xr = (search_network(model, xr), xr) if accelerate and rows.numel() else small_batch_layout(model, xr)
        best_sq = _fast_rows(net, xr, y[img[rows]], btr[rows], steps, eps, overshoot, momentum, fast, progress, total)

    sq_all = torch.full((img.numel(),), float("inf"), dtype=torch.float64)
    sq_all[rows.cpu()] = best_sq.double().cpu()
    for name in searches:
        crit = "l2min" if num_classes == 2 else SEARCHES[name]
        j = criteria.index(crit)
        part = sq_all[j * n : (j + 1) * n]
        ok = torch.isfinite(part)
        found[name] = ok
        rms[name] = torch.where(ok, part.sqrt(), torch.zeros_like(part))
    if progress is not None:
        progress(total, total)
    return Radii(rms, found, "fast", total, {"mode": "fast", **settings, "clamp": False, "fast": fast.as_dict()})


def _follow(logits: torch.Tensor, y: torch.Tensor, btr: torch.Tensor) -> torch.Tensor:
    """Per row: still on the near side of its bound (l2min: y is the argmax; btr: p_y > 1/C)."""
    p_y = logits.softmax(1).gather(1, y.unsqueeze(1))[:, 0]
    return torch.where(btr, p_y > 1.0 / logits.shape[1], logits.argmax(1) == y)


def _fast_rows(model, x, y, btr, steps, eps, overshoot, momentum, fast: FastSettings, progress, total):
    """Best squared rms per row (inf where nothing was found) after the opening's steps and
    the settling steps, with one evaluation after the last step."""
    best_sq = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    best_delta = torch.zeros_like(x)
    delta = torch.zeros_like(x, requires_grad=True)
    mom = torch.zeros_like(x)
    for t in range(total):
        u = t - fast.opening  # settling step (< 0: opening)
        last = t == total - 1
        if last:
            with torch.no_grad():
                logits = model(x + delta)
        else:
            out = model(x + delta)
            logits = out.detach()
        follow = _follow(logits, y, btr)
        sq = delta.detach().pow(2).flatten(1).mean(1)
        better = ~follow & (sq < best_sq)
        best_sq = torch.where(better, sq, best_sq)
        best_delta = torch.where(better.view(-1, 1, 1, 1), delta.detach(), best_delta)
        if progress is not None:
            progress(t + 1, total)
        if last:
            break
        (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), delta)
        with torch.no_grad():
            f = follow.to(x.dtype).view(-1, 1, 1, 1)
            d = f * g + (1 - f) * (-delta)
            d = d / (1e-8 + d.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1))
            if u == 0:
                mom.zero_()
            mom.mul_(momentum).add_(d, alpha=1 - momentum)
            if u < 0:
                delta.add_(mom, alpha=step_size(t, steps, eps, overshoot))
            else:
                # The exact schedule's linear decay over ``settle`` steps, summing to
                # scale * settle * R per row: the first step is about 2 * scale * R.
                r = _reference_radius(best_sq, sq)
                s = r * step_size(u, fast.settle, fast.scale * fast.settle, 1.0)
                delta.add_(mom * s.view(-1, 1, 1, 1))
    return _refine(model, x, y, btr, best_sq, best_delta, fast.refine)


def _refine(model, x, y, btr, best_sq, best_delta, rounds: int) -> torch.Tensor:
    """Bisection on the scale of each row's best delta: the smallest s in (0, 1] found in
    ``rounds`` halvings with x + s * delta still past the bound (forward passes only). The
    settling steps end near the bound along their path, but the best point may sit up to a
    step beyond it along its own ray; the exact search's last steps are a thousandth of its
    radius, so its best point sits on the bound: the bisection brings the fast one there too."""
    found = torch.isfinite(best_sq)
    if rounds <= 0 or not bool(found.any()):
        return best_sq
    idx = found.nonzero().squeeze(1)
    xs, ys, bs, ds = x[idx], y[idx], btr[idx], best_delta[idx]
    lo = torch.zeros(idx.numel(), dtype=x.dtype, device=x.device)
    hi = torch.ones_like(lo)
    with torch.no_grad():
        for _ in range(rounds):
            mid = (lo + hi) / 2
            past = ~_follow(model(xs + mid.view(-1, 1, 1, 1) * ds), ys, bs)
            hi = torch.where(past, mid, hi)
            lo = torch.where(past, lo, mid)
    out = best_sq.clone()
    out[idx] = (hi.view(-1, 1, 1, 1) * ds).pow(2).flatten(1).mean(1)
    return out


def _reference_radius(best_sq: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """R of the settling steps: the best radius so far, or (none found yet) the current rms,
    at least 1e-3 so that a row still at delta = 0 can move."""
    return torch.where(torch.isfinite(best_sq), best_sq.sqrt(), sq.sqrt().clamp_min(1e-3))
