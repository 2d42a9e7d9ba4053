"""A fused copy of a network for inference on the CPU: BN folded into convolutions, a cheaper HHReLU, NHWC.

``inference_copy(model)`` is a frozen copy (``models.nn.runtime.frozen_copy``: eval mode,
parameters without grad) in channels-last layout, cached per model and rebuilt when its
weights change (``weights_key``), with three rewrites that leave its function unchanged up to
float rounding:

- every ``Conv2d`` directly followed by a ``BatchNorm2d`` with running statistics inside an
  ``nn.Sequential`` (a PreActBlock's ``main``, torchvision's ``downsample``) becomes one
  convolution with a bias: W' = W * s, b' = (b - mean) * s + beta with
  s = gamma / sqrt(var + eps), computed in float64 and cast to the weights' dtype; the BN
  becomes an ``nn.Identity`` (so the Sequential's indices, e.g. ``gradcam_layer``, stay);
- every other eval-mode ``BatchNorm2d`` (a PreActBlock's ``pre``, the head BN) becomes an
  affine map x * scale + shift in one ``addcmul`` pass (``_ChannelAffine``);
- every ``HalfHuberReLU`` whose input is a temporary (it follows a Conv2d, a BatchNorm2d or
  its affine map in an ``nn.Sequential``, whose output only it reads) computes in place
  (``_HalfHuberReLUInPlace``): one temporary instead of three, the values bit for bit those
  of ``_HalfHuberReLUFn.forward``. Where autograd records (an input that needs grad), it
  runs that Function with a forward of two temporaries and the same backward, so the copy
  also serves the searches' input-gradient steps (``models.nn.layout``).

classify's forward pass in the worker runs this copy (``worker.compute.forward_checked``), as a
frozen graph (``models.nn.graph``).
CPU ms per image of ``cifar10-robust`` on the 2-core machine, one torch thread, plain model
-> this copy (``bench/bench_inference.py``): batch 1 4.66 -> 3.55, 4 3.31 -> 2.21,
16 3.16 -> 2.00, 32 3.28 -> 2.24 (indicative: a shared machine).
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch import nn

from models.nn.hhrelu import HalfHuberReLU, _HalfHuberReLUFn
from models.nn.runtime import frozen_copy, weights_key

_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


class _HalfHuberReLUFnLean(_HalfHuberReLUFn):
    """``_HalfHuberReLUFn`` (its backward, first order and double) with a forward of two
    temporaries instead of three: relu(x - d) takes c * c [* k] in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: float) -> torch.Tensor:
        c = x.clamp(0.0, delta)
        out = x.sub(delta).clamp_min_(0.0)
        k = 0.5 / delta
        out = out.addcmul_(c, c) if k == 1.0 else out.add_(c.mul(c).mul_(k))
        ctx.save_for_backward(x, c)
        ctx.delta = delta
        return out


class _HalfHuberReLUInPlace(nn.Module):
    """HHReLU that overwrites its input (N x C x H x W, any float dtype) when no graph is
    recorded: for an input that is a temporary nothing else reads."""

    def __init__(self, delta: float):
        super().__init__()
        self.delta = float(delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.delta
        if x.requires_grad and torch.is_grad_enabled():
            return _HalfHuberReLUFnLean.apply(x, d)
        # The float operations of _HalfHuberReLUFn.forward in its order, c * c [* k] + relu(x - d)
        # with c = clamp(x, 0, d): relu(x - d) is the one temporary, c is x clamped in place.
        t = x.sub(d).clamp_min_(0.0)
        x = x.clamp_(0.0, d)
        k = 0.5 / d
        if k == 1.0:
            # t + c * c in one pass: addcmul's value 1 multiplies exactly, and its sum is the
            # same single rounding of c * c + t (checked bit for bit in the tests).
            return t.addcmul_(x, x)
        return x.mul_(x).mul_(k).add_(t)

    def extra_repr(self) -> str:
        return f"delta={self.delta}, in place"


class _ChannelAffine(nn.Module):
    """An eval-mode BatchNorm2d as y = x * scale + shift per channel, in one pass
    (``torch.addcmul``; a third of ``F.batch_norm``'s time at batch 1). x: N x C x H x W."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        scale, shift = _bn_affine(bn)
        dtype = bn.running_mean.dtype
        self.register_buffer("scale", scale.to(dtype).view(1, -1, 1, 1))
        self.register_buffer("shift", shift.to(dtype).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float64 vectors of C: eval-mode ``bn`` is x * scale + shift."""
    scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` into ``conv`` (in place; conv gains a bias)."""
    w = conv.weight.detach()
    scale, shift = _bn_affine(bn)
    bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    conv.weight = nn.Parameter((w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)


def _eval_bn(bn: nn.Module) -> bool:
    """A BatchNorm2d that normalises with running statistics in eval mode."""
    return type(bn) is nn.BatchNorm2d and bn.running_mean is not None and bn.running_var is not None


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and _eval_bn(bn) and conv.out_channels == bn.num_features


def fuse(model: nn.Module) -> nn.Module:
    """Rewrite ``model`` (a frozen copy, modified in place) as described above; returns it."""
    # A convolution used in more than one place keeps its weights (its other uses have no BN).
    uses = Counter(id(m) for m in model.modules(remove_duplicate=False))
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for i, name in enumerate(names):
            child = seq._modules[name]
            if i + 1 < len(names) and uses[id(child)] == 1 and _foldable(child, seq._modules[names[i + 1]]):
                _fold(child, seq._modules[names[i + 1]])
                seq._modules[names[i + 1]] = nn.Identity()
            elif type(child) is HalfHuberReLU and i > 0:
                # The nearest module before it that is not an Identity made its input.
                before = next(
                    (seq._modules[n] for n in reversed(names[:i]) if type(seq._modules[n]) is not nn.Identity), None
                )
                if type(before) in (nn.Conv2d, nn.BatchNorm2d, _ChannelAffine):
                    seq._modules[name] = _HalfHuberReLUInPlace(child.delta)
    # Every other eval-mode BN (a PreActBlock's ``pre``, the head BN) becomes an affine map.
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if _eval_bn(child):
                setattr(parent, name, _ChannelAffine(child))
    return model


def inference_copy(model: nn.Module) -> nn.Module:
    """The fused channels-last copy of ``model`` (cached; rebuilt once its weights change).
    It takes the same input (N x C x H x W, either layout; NHWC is faster) and returns the
    same logits to float rounding."""
    key = weights_key(model)
    hit = _CACHE.get(model)
    if hit is None or hit[0] != key:
        # Built outside inference mode even when asked for inside it (classify's forward pass,
        # the worker's warm-up): tensors made in inference mode could never take part in the
        # searches' autograd afterwards.
        with torch.inference_mode(False):
            copy = fuse(frozen_copy(model)).to(memory_format=torch.channels_last)
        _CACHE[model] = hit = (key, copy)
    return hit[1]
