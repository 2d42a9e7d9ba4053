"""Half-Huber ReLU (Woods, Chen & Teuscher 2019).

f(x) = 0 (x <= 0); x^2 / (2 delta) (0 < x <= delta); x - delta/2 (x > delta)
f'(x) = clamp(x, 0, delta) / delta

A custom autograd function keeps its input and clamp(x, 0, delta) instead of the several
intermediates a composition of ``where``/``clamp`` would keep, and computes in place; its
values and gradients are bit for bit those of the plain formula (so search results do not
move). Its backward is written in differentiable torch ops when a graph is being built, so
double back-propagation (the training penalty) works through it.
"""

from __future__ import annotations

import torch
from torch import nn

from models.defaults import HHRELU_DELTA


class _HalfHuberReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: float) -> torch.Tensor:
        # clamp(x,0,d)^2/(2d) + relu(x-d) equals the piecewise definition everywhere. The
        # same float operations in the same order as the plain formula
        # ``c * c * (0.5 / d) + (x - d).clamp_min(0)``, so the values are bit for bit those of
        # that formula, in fewer passes over memory: the products and sums run in place, and
        # the multiplication by 0.5 / d is skipped where it is exactly 1 (d = 0.5).
        c = x.clamp(0.0, delta)
        out = c * c
        k = 0.5 / delta
        if k != 1.0:
            out.mul_(k)
        out.add_(x.sub(delta).clamp_min_(0.0))
        # c = f'(x) * d serves a first-order backward without recomputing it; x serves the
        # differentiable backward of double back-propagation.
        ctx.save_for_backward(x, c)
        ctx.delta = delta
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, c = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: plain torch ops in x, so they are recorded, giving
            # f''(x) = 1/delta on (0, delta) and 0 elsewhere.
            return grad_out * x.clamp(0.0, ctx.delta) * (1.0 / ctx.delta), None
        # First order (the searches): the same products as above, on the saved clamp.
        g = grad_out * c
        k = 1.0 / ctx.delta
        return (g.mul_(k) if k != 1.0 else g), None


def half_huber_relu(x: torch.Tensor, delta: float = HHRELU_DELTA) -> torch.Tensor:
    """Apply HHReLU elementwise. x: any shape, any float dtype; returns the same shape."""
    if delta <= 0:
        raise ValueError(f"HHReLU delta must be > 0, got {delta}")
    return _HalfHuberReLUFn.apply(x, float(delta))


class HalfHuberReLU(nn.Module):
    """HHReLU module. ``delta`` is stored as a buffer ``d`` (as in the reference networks)."""

    def __init__(self, delta: float = HHRELU_DELTA):
        super().__init__()
        if delta <= 0:
            raise ValueError(f"HHReLU delta must be > 0, got {delta}")
        self.register_buffer("d", torch.tensor(float(delta)))
        # delta as a Python float as well: reading the buffer in forward (float(self.d)) would
        # synchronise with the GPU at every activation, stalling its queue of kernels.
        self.delta = float(delta)
        self.register_load_state_dict_post_hook(_refresh_delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _HalfHuberReLUFn.apply(x, self.delta)

    def extra_repr(self) -> str:
        return f"delta={self.delta}"


def _refresh_delta(module: HalfHuberReLU, incompatible_keys) -> None:
    module.delta = float(module.d)
