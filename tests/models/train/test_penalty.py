"""The Lipschitz-inspired penalty and the adaptive psi, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.nn.registry import create_model
from models.train.penalty import AdaptivePsi, input_gradient_penalty, penalty_scalars


def hand_psi_sequence(losses, psi0=220.0, k=0.02, target=1.5, eps_better=1.0, eps_worse=0.01):
    """The formula from ALGORITHMS.md written out independently, one batch at a time."""
    s, out = 0.0, []
    for ce in losses:
        step = -math.log(ce / target)
        step = max(-eps_worse, min(eps_better, step))
        s = max(0.0, s + step)
        out.append((s, psi0 * math.exp(k * s)))
    return out


def test_psi_follows_the_formula_over_a_scripted_loss_sequence():
    losses = [2.3, 2.0, 1.6, 1.5, 1.2, 0.9, 0.5, 0.05, 0.4, 3.0, 2.5, 1.45, 1.49, 0.2, 7.0, 1.0, 0.01]
    psi = AdaptivePsi()
    expected = hand_psi_sequence(losses)
    for ce, (s, p) in zip(losses, expected):
        got = psi.update(ce)
        assert pytest.approx(s, rel=1e-12, abs=1e-15) == psi.S
        assert got == pytest.approx(p, rel=1e-12)
    assert psi.S > 0


def test_psi_worked_values():
    psi = AdaptivePsi()
    assert psi.psi == pytest.approx(220.0)
    psi.update(3.0)  # worse than target: -ln 2 clipped to -0.01, but S stays >= 0
    assert psi.S == 0.0
    psi.update(0.5)  # better: -ln(1/3) = 1.0986 clipped to +1
    assert pytest.approx(1.0) == psi.S
    assert psi.psi == pytest.approx(220.0 * math.exp(0.02))
    psi.update(1.5 * math.exp(-0.25))  # unclipped step of exactly +0.25
    assert pytest.approx(1.25) == psi.S
    psi.update(3.0)
    assert pytest.approx(1.24) == psi.S
    psi.update(0.0)  # zero loss takes the full eps_better step
    assert pytest.approx(2.24) == psi.S


def test_psi_constants_are_settable_and_state_round_trips():
    psi = AdaptivePsi(psi0=10.0, k_psi=0.5, l_target=1.0, eps_better=0.3, eps_worse=0.2)
    psi.update(0.1)
    assert pytest.approx(0.3) == psi.S
    assert psi.psi == pytest.approx(10.0 * math.exp(0.15))
    psi.update(math.e)  # -ln(e) = -1, clipped to -0.2
    assert pytest.approx(0.1) == psi.S
    other = AdaptivePsi()
    other.load_state_dict(psi.state_dict())
    assert other == psi
    with pytest.raises(ValueError):
        psi.update(float("nan"))


def test_penalty_scalars_pick_margin_or_random_logit_with_probability_zeta():
    n, c = 20000, 5
    logits = torch.randn(n, c, dtype=torch.float64)
    labels = torch.randint(0, c, (n,))
    gen = torch.Generator().manual_seed(3)
    s = penalty_scalars(logits, labels, zeta=0.2, generator=gen)
    others = logits.clone()
    others[torch.arange(n), labels] = -math.inf
    margin = logits[torch.arange(n), labels] - others.max(1).values
    is_margin = s == margin
    is_logit = (s.unsqueeze(1) == logits).any(1)
    assert bool((is_margin | is_logit).all())
    assert 0.19 < float(is_margin.double().mean()) < 0.21
    # The random logit is uniform over classes.
    picked = (s.unsqueeze(1) == logits)[~is_margin].double().argmax(1)
    counts = torch.bincount(picked, minlength=c).double() / picked.numel()
    assert bool(((counts - 1 / c).abs() < 0.02).all())
    # zeta 0: never the margin; zeta 1: always.
    assert torch.equal(penalty_scalars(logits, labels, 1.0, gen), margin)
    s0 = penalty_scalars(logits, labels, 0.0, gen)
    assert bool((s0.unsqueeze(1) == logits).any(1).all())


def test_penalty_value_on_a_linear_model_matches_the_closed_form():
    # f(x) = W flatten(x) + b: d margin / dx = W_y - W_j* exactly.
    torch.manual_seed(0)
    n, c, shape = 6, 4, (1, 3, 3)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(9, c)).double()
    x = torch.rand(n, *shape, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n,))
    logits = lin(x)
    pen = input_gradient_penalty(x, logits, y, psi=7.0, zeta=1.0, z=2.0)
    w = lin[1].weight.detach()
    other = logits.detach().clone()
    other[torch.arange(n), y] = -math.inf
    j = other.argmax(1)
    g = w[y] - w[j]  # n x 9
    assert float(pen.detach()) == pytest.approx(7.0 * float(g.pow(2).mean()), rel=1e-12)
    pen1 = input_gradient_penalty(x, lin(x), y, psi=1.0, zeta=1.0, z=1.0)
    assert float(pen1.detach()) == pytest.approx(float(g.abs().mean()), rel=1e-12)


@pytest.mark.parametrize("activation", ["relu", "hhrelu"])
def test_penalty_gradient_reaches_every_conv_weight(activation):
    torch.manual_seed(0)
    net = create_model(
        "preact_resnet",
        depth=8,
        width=4,
        in_channels=1,
        num_classes=3,
        input_size=28,
        activation=activation,
        zero_init_residual=False,
    )
    net.train()
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    pen = input_gradient_penalty(x, net(x), y, psi=1.0, zeta=0.5, generator=torch.Generator().manual_seed(0))
    pen.backward()
    for name, p in net.named_parameters():
        if p.ndim == 4:  # conv weights
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_double_backprop_through_hhrelu_matches_finite_differences():
    # The penalty's derivative with respect to weights runs through HHReLU's backward (its
    # second derivative 1/delta on (0, delta)); compare it with central differences.
    torch.manual_seed(1)
    net = create_model(
        "preact_resnet",
        depth=8,
        width=2,
        in_channels=1,
        num_classes=2,
        input_size=28,
        activation="hhrelu",
        zero_init_residual=False,
    ).double()
    net.eval()  # fixed BatchNorm statistics: the penalty is a smooth function of the weights
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64) * 2
    y = torch.tensor([0, 1])
    weight = net.pipe[1][0].main[0].weight  # first block's first conv, 2x2x3x3

    def penalty_of(w: torch.Tensor) -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        out = torch.func.functional_call(net, {"pipe.1.0.main.0.weight": w}, (xi,))
        return input_gradient_penalty(xi, out, y, psi=3.0, zeta=1.0)

    assert torch.autograd.gradcheck(
        penalty_of, (weight.detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-4
    )


def test_penalty_needs_an_input_that_requires_grad():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(ValueError, match="requires_grad"):
        input_gradient_penalty(x, net(x), torch.tensor([0, 1]), psi=1.0)
