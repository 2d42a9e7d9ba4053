"""An opt-in ``torch.compile``d copy of a network for the input-gradient searches, guarded.

The searches (explanations, adversarial training's bounded search, the fast stability
radii) call a network hundreds of times on batches of one shape with gradients wanted for
the input only. ``search_network(model)`` returns a frozen copy of the network (eval mode,
parameters without grad, so the compiled backward computes nothing for them) compiled with
dynamic batch size, cached per model. On a 2-core CPU its step (forward and input gradient)
takes 0.6-0.7x the eager step once compiled, but compiling takes one to two minutes per
process, so it pays only in a long-lived worker; it is off unless asked for
(``accelerate=True``, or ``AEX_COMPILE=1`` in the environment as the default).

Compiled code rounds differently from eager code (the radii of a search move within float
noise), so the exact ARA searches never use it. Where compilation is impossible (no C++
compiler, an unsupported platform, any error while compiling or in the first call), the
eager network is used instead, once and for all for that model, with a warning.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
from torch import nn

from models.nn.runtime import frozen_copy, weights_key

_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def accelerate_default() -> bool:
    """``AEX_COMPILE=1`` turns compiled searches on by default."""
    return os.environ.get("AEX_COMPILE", "").strip().lower() in ("1", "true", "yes", "on")


class _Guarded(nn.Module):
    """The compiled network, falling back to the eager frozen copy if compiling fails."""

    def __init__(self, frozen: nn.Module):
        super().__init__()
        self.frozen = frozen
        self.compiled = None
        self.failed = False
        try:
            self.compiled = torch.compile(frozen, dynamic=True)
        except Exception as exc:
            self._fall_back(exc)

    def _fall_back(self, exc: BaseException) -> None:
        self.failed = True
        warnings.warn(
            f"torch.compile is not available here ({type(exc).__name__}: {exc}); searching eagerly", stacklevel=3
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed or self.compiled is None:
            return self.frozen(x)
        return self.compiled(x)

    def trial(self, x: torch.Tensor) -> None:
        """Compile now (forward and input gradient on a copy of x); fall back on any error."""
        if self.failed or self.compiled is None:
            return
        try:
            probe = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = self.compiled(probe)
                torch.autograd.grad(out.float().sum(), probe)
        except Exception as exc:
            self._fall_back(exc)


def search_network(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """The compiled frozen copy of ``model`` for searches (built, and compiled on ``example``,
    on first use; rebuilt when the model's weights change)."""
    key = weights_key(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    frozen = frozen_copy(model)
    guarded = _Guarded(frozen)
    if example is not None:
        guarded.trial(example)
    _CACHE[model] = (key, guarded)
    return guarded
