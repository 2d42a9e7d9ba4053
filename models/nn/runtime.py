"""Small helpers about where and how a model runs (device, eval mode, frozen copies for searches)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from models.errors import BadParameterError


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``name`` if given (e.g. "cpu", "cuda:1"), else CUDA when present, else CPU."""
    if name is None or str(name) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise BadParameterError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadParameterError(f"device {name!r} was asked for but CUDA is not available")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless module."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards
    (a model in training can hold submodules deliberately kept in eval, e.g. frozen BN)."""
    # Only the modules in training mode are switched (and switched back): a served model is
    # in eval mode already, and setting the flag on its every module costs most of a
    # millisecond per forward pass (nn.Module.__setattr__).
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield model
    finally:
        for m in training:
            m.training = True


@contextmanager
def full_precision() -> Iterator[None]:
    """Plain float32 on CUDA for the duration (no TF32 in convolutions or matmuls), so that
    figures measured on a GPU are the figures a CPU measures: TF32 rounds inputs to 10-bit
    mantissas, enough to flip a borderline image of a test set (seen: 0.8660 on an H100,
    0.8661 on the CPU for the same checkpoint). Also a decorator: ``@full_precision()``."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place: a copy of the
    model cached under it is stale once it differs."""
    # A walk of the modules' own dicts: a quarter of the time of model.parameters() and
    # model.buffers() (0.1 vs 0.4 ms for ResNet-44), which matters at every forward pass of
    # a served model (models.nn.inference). A tensor shared by two modules counts twice.
    tensors: list = []
    stack = [model]
    while stack:
        module = stack.pop()
        tensors += module._parameters.values()
        tensors += module._buffers.values()
        stack += [m for m in module._modules.values() if m is not None]
    return tuple([(t.data_ptr(), t._version) for t in tensors if t is not None])


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with parameters that need no grad (so an input-gradient
    search's backward computes nothing for them)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def deterministic_kernels(on: bool, *, warn_only: bool = True) -> None:
    """Ask torch for deterministic kernels (process-wide), or stop asking.

    With them on, torch also fills every fresh allocation with NaN by default
    (``torch.utils.deterministic.fill_uninitialized_memory``), a debugging aid against ops that
    read memory they never wrote, which no op of ours does. It is turned off: it changes no
    kernel's arithmetic and no result, and it cost a classify forward pass on the CPU about
    0.5 ms of 3.9 at batch 1 and 7% at batch 16 (cifar10-robust, one thread), and every
    gradient of a search as much again (each step allocates its activations anew)."""
    torch.use_deterministic_algorithms(on, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = not on
