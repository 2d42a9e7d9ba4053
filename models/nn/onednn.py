"""Convolutions through oneDNN at every batch size: a copy of a network whose ``Conv2d`` layers call torch's oneDNN (mkldnn) kernel directly, for classify's graph on the CPU.

``torch.nn.functional.conv2d`` chooses a kernel per call. On the CPU, for a batch of one
small image (at most 20,480 input values: 16 x 32 x 32, say) with a 3 x 3 kernel, and for a
1 x 1 convolution without stride below a batch of 16 on one thread, it takes torch's native
im2col + GEMM kernel ("for some case, native is faster": ``ConvParams::use_mkldnn`` in
``aten/src/ATen/native/Convolution.cpp``) rather than oneDNN's. On this project's 2-core CPU
(AVX-512), one thread, NHWC, one ``cifar10-robust`` image: a 16 -> 16 channel 3 x 3
convolution on 32 x 32 takes 81 us natively and 47 us through oneDNN, 32 -> 32 on 16 x 16 57
and 44 us; the whole network's forward pass at batch 1 3.9 and 2.5 ms (``bench/bench_inference.py``;
from a batch of 2 on, the two are as fast). A lone classify job (one client) runs at batch 1.

``onednn_copy(copy)`` is ``copy`` with each such layer replaced by ``OneDnnConv2d``, sharing its
weights (no memory but the new modules'). The results are the same convolution up to float
rounding: another kernel sums in another order (logits about 1e-7 apart on ``cifar10-robust``).
Where oneDNN is not built into torch, or a layer is not a plain float32 ``Conv2d`` with zero
padding given as numbers, that layer is left as it is.
"""

from __future__ import annotations

import copy as copying

import torch
from torch import nn


class OneDnnConv2d(nn.Module):
    """A ``Conv2d``'s forward pass through ``torch.mkldnn_convolution``: input float32
    N x C_in x H x W on the CPU (channels-last is the layout oneDNN runs without a copy),
    output N x C_out x H' x W', the same as the layer's to float rounding. It holds the
    layer's own weight and bias tensors."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mkldnn_convolution(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
        )


def _replaceable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
    )


def onednn_copy(copy: nn.Module) -> nn.Module:
    """``copy`` (an eval-mode network on the CPU) with every plain float32 ``Conv2d`` run by
    oneDNN (``OneDnnConv2d``): a new module tree over the same parameter and buffer tensors;
    ``copy`` itself when oneDNN is not available or no layer qualifies. Inference only: its
    convolutions have oneDNN's backward, but nothing here was checked for training."""
    if not torch.backends.mkldnn.is_available() or not any(map(_replaceable, copy.modules())):
        return copy
    # The tensors are shared, not copied: only the modules are new.
    memo = {id(t): t for t in (*copy.parameters(), *copy.buffers())}
    out = copying.deepcopy(copy, memo)
    for parent in list(out.modules()):
        for name, child in parent.named_children():
            if _replaceable(child):
                setattr(parent, name, OneDnnConv2d(child))
    return out
