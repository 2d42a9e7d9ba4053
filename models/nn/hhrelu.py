"""Half-Huber ReLU (Woods, Chen & Teuscher 2019).

f(x) = 0 (x <= 0); x^2 / (2 delta) (0 < x <= delta); x - delta/2 (x > delta)
f'(x) = clamp(x, 0, delta) / delta

A custom autograd function saves only its input (like ReLU) instead of the several
intermediates a composition of ``where``/``clamp`` would keep; its backward is written in
differentiable torch ops so double back-propagation (the training penalty) works through it.
"""

from __future__ import annotations

import torch
from torch import nn

from models.defaults import HHRELU_DELTA


class _HalfHuberReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.delta = delta
        c = x.clamp(0.0, delta)
        # clamp(x,0,d)^2/(2d) + relu(x-d) equals the piecewise definition everywhere.
        return c * c * (0.5 / delta) + (x - delta).clamp_min(0.0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        # Plain torch ops: under create_graph=True they are recorded, giving f''(x) = 1/delta
        # on (0, delta) and 0 elsewhere.
        return grad_out * x.clamp(0.0, ctx.delta) * (1.0 / ctx.delta), None


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
