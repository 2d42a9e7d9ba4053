import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.errors import BadParameterError, BoundNotReachedError
from models.perturb.engine import perturbation_search, rms, step_size


def spec_search(model, x, y, mode, steps, eps, overshoot=1.0, momentum=0.0, affected=None):
    """ALGORITHMS.md "The perturbation search", transcribed literally: whole batch every
    step, no dropped rows, no clamping. Returns (delta, first_ok_step or steps + 999)."""
    n = x.shape[0]
    y = torch.as_tensor(y)
    affected = torch.ones(n) if affected is None else torch.as_tensor(affected, dtype=x.dtype)
    affected = affected.view(-1, 1, 1, 1)
    delta = torch.zeros_like(x, requires_grad=True)
    m = torch.zeros_like(x)
    first = torch.full((n,), steps + 999)
    best = torch.zeros_like(x)
    best_sq = torch.full((n,), 1e30, dtype=x.dtype)
    extra = 1 if mode in ("l2min", "btr") else 0
    for t in range(steps + extra):
        logits = model(x + delta)
        loss = F.cross_entropy(logits, y, reduction="none")
        g = torch.autograd.grad(loss.sum(), delta)[0]
        sq = delta.detach().pow(2).mean((1, 2, 3))
        if mode in ("bounded", "explain"):
            follow = (sq < eps**2).to(x.dtype)
        elif mode == "l2min":
            follow = (logits.argmax(1) == y).to(x.dtype)
        else:
            follow = (logits.softmax(1).gather(1, y[:, None])[:, 0] > 1 / logits.shape[1]).to(x.dtype)
        ok = follow == 0
        first[ok & (first > t)] = t
        if extra:
            better = ok & (sq < best_sq)
            best[better] = delta.detach()[better]
            best_sq[better] = sq[better]
            if t == steps:
                return best, first
        if mode == "explain":
            g = -g
        s = eps * overshoot * (steps - t) / (steps * (steps + 1) / 2)
        f = follow.view(-1, 1, 1, 1)
        d = f * g + (1 - f) * -delta.detach()
        d = d / (1e-8 + d.pow(2).mean((1, 2, 3)).sqrt().view(-1, 1, 1, 1))
        if momentum > 0:
            m = momentum * m + (1 - momentum) * d
            d = m
        with torch.no_grad():
            delta += s * d * affected
    return delta.detach(), first


def test_step_sizes_sum_to_eps_times_k():
    assert math.isclose(sum(step_size(t, 35, 0.1, 5) for t in range(35)), 0.5, rel_tol=1e-12)
    assert step_size(0, 10, 1, 1) > step_size(9, 10, 1, 1) > 0


@pytest.mark.parametrize(
    "mode,kw",
    [
        ("bounded", dict(steps=7, eps=0.02)),
        ("l2min", dict(steps=40, eps=2.0, momentum=0.9)),
        ("btr", dict(steps=40, eps=2.0, momentum=0.9)),
        ("explain", dict(steps=35, eps=0.1, overshoot=5)),
    ],
)
def test_engine_matches_literal_algorithm(tiny_model, images, mode, kw):
    """Same deltas as the spec on a batch with an already-wrong row and an unaffected row.

    In float64: the minimal searches (momentum 0.9, 40 steps crossing the bound back and forth)
    amplify a difference of float32 rounding between the two implementations' reductions into
    a different path on some CPUs' kernels; in float64 the paths agree on every machine."""
    tiny_model = copy.deepcopy(tiny_model).double()
    images = images.double()
    with torch.no_grad():
        pred = tiny_model(images).argmax(1)
    y = pred.clone()
    y[0] = (pred[0] + 1) % 10  # already wrong at delta = 0
    if mode == "explain":
        y = (pred + 3) % 10
    affected = torch.ones(6)
    affected[2] = 0
    ours = perturbation_search(tiny_model, images, y, mode=mode, affected=affected, bound_check=False, **kw)
    ref_delta, ref_first = spec_search(tiny_model, images, y, mode, affected=affected, **kw)
    torch.testing.assert_close(ours.delta, ref_delta, atol=2e-5, rtol=1e-4)
    reached = ref_first < kw["steps"] + 999
    live = affected.bool()
    assert torch.equal(ours.found[live], reached[live])
    assert torch.equal(ours.first_ok_step[live & reached], ref_first[live & reached])
    assert torch.all(ours.delta[2] == 0)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits_after, tiny_model(images + ours.delta), atol=1e-5, rtol=1e-5)


def test_bounded_stays_within_eps_times_k_and_raises_loss(tiny_model, images):
    y = tiny_model(images).argmax(1)
    for k in (1.0, 3.0):
        res = perturbation_search(
            tiny_model, images, y, mode="bounded", steps=7, eps=0.03, overshoot=k, bound_check=False
        )
        assert torch.all(res.rms <= 0.03 * k * (1 + 1e-5))
        assert torch.all(res.rms > 0.01)
        ce_before = F.cross_entropy(res.logits_before, y, reduction="none")
        ce_after = F.cross_entropy(res.logits_after, y, reduction="none")
        assert torch.all(ce_after > ce_before)


def test_l2min_flips_the_class_and_keeps_already_wrong_at_zero(tiny_hh_model, images):
    with torch.no_grad():
        y = tiny_hh_model(images).argmax(1)
    y[1] = (y[1] + 1) % 10
    res = perturbation_search(tiny_hh_model, images, y, mode="l2min", steps=60, eps=2.0, momentum=0.9)
    assert res.rms[1] == 0 and torch.all(res.delta[1] == 0) and res.first_ok_step[1] == 0
    others = torch.arange(6) != 1
    assert torch.all(res.rms[others] > 0)
    with torch.no_grad():
        after = tiny_hh_model(images + res.delta).argmax(1)
    assert torch.all(after != y)


def test_btr_brings_p_y_to_chance(tiny_model, images):
    y = tiny_model(images).argmax(1)
    res = perturbation_search(tiny_model, images, y, mode="btr", steps=60, eps=2.0, momentum=0.9)
    with torch.no_grad():
        p = tiny_model(images + res.delta).softmax(1).gather(1, y[:, None])[:, 0]
    assert torch.all(p <= 0.1 + 1e-6)
    assert torch.all(res.found)


def test_explain_raises_target_probability(tiny_hh_model, images):
    with torch.no_grad():
        target = (tiny_hh_model(images).argmax(1) + 5) % 10
    res = perturbation_search(tiny_hh_model, images, target, mode="explain", steps=35, eps=0.1, overshoot=5)
    before = res.logits_before.softmax(1).gather(1, target[:, None])[:, 0]
    after = res.logits_after.softmax(1).gather(1, target[:, None])[:, 0]
    assert torch.all(after > before + 0.05)
    assert torch.all(res.rms < 0.1 * 1.2) and torch.all(res.rms > 0.05)


@pytest.mark.parametrize("mode", ["bounded", "explain", "l2min"])
def test_clamp_keeps_pixels_in_range(tiny_model, mode):
    # Saturated images: almost any step leaves [0, 1] unless clamped.
    x = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    y = tiny_model(x).argmax(1)
    if mode == "explain":
        y = (y + 1) % 10
    kw = dict(steps=20, eps=0.2, overshoot=2.0, bound_check=False)
    free = perturbation_search(tiny_model, x, y, mode=mode, **kw)
    assert ((x + free.delta) < 0).any() or ((x + free.delta) > 1).any()
    clamped = perturbation_search(tiny_model, x, y, mode=mode, clamp=True, **kw)
    z = x + clamped.delta
    assert z.min() >= 0 and z.max() <= 1
    assert torch.all(clamped.rms > 0)


def test_bound_check_raises_and_can_be_switched_off(tiny_model, images):
    y = tiny_model(images).argmax(1)
    # k = 1 in bounded mode: the steps add up to eps only at the very end.
    with pytest.raises(BoundNotReachedError, match="increase eps"):
        perturbation_search(tiny_model, images, y, mode="bounded", steps=7, eps=0.01)
    with pytest.raises(BoundNotReachedError, match="increase eps"):
        perturbation_search(tiny_model, images, y, mode="l2min", steps=10, eps=1e-4)
    res = perturbation_search(tiny_model, images, y, mode="l2min", steps=10, eps=1e-4, bound_check=False)
    # Nothing found: delta stays zero (the reference's result) and found says so.
    assert not res.found.any() and torch.all(res.rms == 0)
    assert torch.all(res.first_ok_step == -1)


def test_no_grads_on_params_and_mode_restored(tiny_model, images):
    tiny_model.train()
    tiny_model.pipe[4].eval()  # a submodule deliberately in eval stays so
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    y = torch.zeros(6, dtype=torch.long)
    perturbation_search(tiny_model, images, y, mode="bounded", steps=5, eps=0.02, bound_check=False)
    assert all(p.grad is None for p in tiny_model.parameters())
    assert tiny_model.training and not tiny_model.pipe[4].training and tiny_model.pipe[1].training
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats untouched


def test_progress_and_bad_parameters(tiny_model, images):
    calls = []
    y = tiny_model(images).argmax(1)
    perturbation_search(
        tiny_model, images, y, mode="l2min", steps=12, eps=2.0, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (13, 13) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(BadParameterError):
        perturbation_search(tiny_model, images, y, mode="nope", steps=3, eps=1.0)
    with pytest.raises(BadParameterError):
        perturbation_search(tiny_model, images, y[:2], mode="bounded", steps=3, eps=1.0)
    with pytest.raises(BadParameterError):
        perturbation_search(tiny_model, images, y + 10, mode="bounded", steps=3, eps=1.0)


def test_rms_is_per_sample():
    d = torch.zeros(2, 3, 4, 4)
    d[1] = 2.0
    assert rms(d).tolist() == [0.0, 2.0]


def test_explaining_a_class_the_network_is_certain_of_is_not_a_bound_failure():
    """The target's probability rounds to 1: the loss gradient vanishes and delta cannot grow
    to rho, which no larger rho or more steps would change. A standard network is often this
    certain of its predicted class; the search returns what it has instead of failing."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    with torch.no_grad():
        net[1].weight.mul_(1000.0)
    x = torch.rand(2, 3, 4, 4)
    y = net(x).argmax(1)
    assert bool((net(x).softmax(1).max(1).values == 1.0).all())
    res = perturbation_search(net, x, y, mode="explain", steps=35, eps=0.1, overshoot=5.0, momentum=0.0)
    assert bool(res.saturated.all()) and bool((res.rms < 0.1).all())
    # A network that is never that certain still reaches rho (and nothing is marked saturated).
    with torch.no_grad():
        net[1].weight.div_(1000.0)
    res = perturbation_search(net, x, y, mode="explain", steps=35, eps=0.1, overshoot=5.0, momentum=0.0)
    assert not bool(res.saturated.any()) and bool((res.rms >= 0.1 - 1e-6).all())
