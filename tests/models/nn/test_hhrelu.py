import pytest
import torch

from models.nn.hhrelu import HalfHuberReLU, half_huber_relu


def piecewise(x: torch.Tensor, d: float) -> torch.Tensor:
    """ALGORITHMS.md: 0 for x <= 0; x^2/(2d) on (0, d]; x - d/2 above d."""
    return torch.where(x <= 0, torch.zeros_like(x), torch.where(x <= d, x * x / (2 * d), x - d / 2))


def points_away_from_kinks(d: float, n: int = 40) -> torch.Tensor:
    """float64 points in [-2d, 3d] at least 0.02 d from the kinks 0 and d (f'' jumps there,
    so finite differences of the gradient are only valid away from them)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 5 - 2) * d
    near = (x.abs() < 0.02 * d) | ((x - d).abs() < 0.02 * d)
    return torch.where(near, x + 0.05 * d, x).requires_grad_(True)


@pytest.mark.parametrize("d", [0.5, 0.1, 2.0])
def test_gradcheck_and_gradgradcheck(d):
    x = points_away_from_kinks(d)
    fn = lambda t: half_huber_relu(t, d)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [0.5, 0.1, 2.0])
def test_values_and_derivatives_follow_the_formula(d):
    x = torch.linspace(-3 * d, 3 * d, 601, dtype=torch.float64, requires_grad=True)
    y = half_huber_relu(x, d)
    torch.testing.assert_close(y, piecewise(x.detach(), d))
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    torch.testing.assert_close(g, x.detach().clamp(0, d) / d)  # f'(x) = clamp(x, 0, d) / d
    (h,) = torch.autograd.grad(g.sum(), x)
    inside = (x.detach() > 0) & (x.detach() < d)
    # f'' is undefined at the kinks 0 and d (the grid hits both exactly for d = 0.5 and 2);
    # which one-sided value autograd gives there is a convention of the torch release (this
    # test failed there under torch 2.11 on a GPU machine, passes under 2.14), so compare
    # everywhere else.
    smooth = (x.detach() != 0) & (x.detach() != d)
    torch.testing.assert_close(h[smooth], torch.where(inside, 1 / d, 0.0).to(h.dtype)[smooth])


def test_module_matches_function_and_keeps_delta_buffer():
    m = HalfHuberReLU(0.25)
    assert float(m.d) == 0.25 and "d" in dict(m.named_buffers())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(m(x), half_huber_relu(x, 0.25))
    with pytest.raises(ValueError):
        HalfHuberReLU(0.0)
    with pytest.raises(ValueError):
        half_huber_relu(x, -1.0)


@pytest.mark.parametrize("d", [0.5, 0.1, 2.0])
def test_bit_for_bit_the_plain_clamp_formula(d):
    """The in-place forward and the first-order backward on the saved clamp give exactly the
    floats of ``clamp(x,0,d)^2 * (0.5/d) + relu(x - d)`` and its plain autograd gradient
    ``g * clamp(x,0,d) * (1/d)``, so the searches' results do not depend on the rewrite."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 8, 16, 16, generator=g) * 2 * d).requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=g)
    y = half_huber_relu(x, d)
    (gx,) = torch.autograd.grad(y, x, grad_out)
    xd = x.detach()
    c = xd.clamp(0.0, d)
    assert torch.equal(y.detach(), c * c * (0.5 / d) + (xd - d).clamp_min(0.0))
    assert torch.equal(gx, grad_out * c * (1.0 / d))
