"""Pre-activation ResNets with normalisation inside the model.

The module layout (``pipe.0`` stem, ``pipe.1..3`` stages, ``pipe.4`` head BN, ``pipe.5`` act,
``pipe.6`` pool, ``pipe.7`` 1x1 classifier conv, ``input_offset`` = [mean, std]) follows the
reference CIFAR-10 code exactly, so its released state dicts load with strict key checks.

Inputs: float tensors N x C x H x W with values in [0, 1]. Outputs: logits N x num_classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.defaults import HHRELU_DELTA
from models.nn.hhrelu import HalfHuberReLU

ACTIVATIONS = ("relu", "hhrelu")


def make_activation(name: str, hhrelu_delta: float = HHRELU_DELTA) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "hhrelu":
        return HalfHuberReLU(hhrelu_delta)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """pre = act(BN(x)); main = conv3x3(stride) -> BN -> act -> conv3x3 on pre;
    shortcut = x when the shape is kept, else a 3x3 strided conv on pre."""

    def __init__(self, cin: int, cout: int, stride: int, act: str, delta: float):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), make_activation(act, delta))
        self.main = nn.Sequential(
            conv3x3(cin, cout, stride),
            nn.BatchNorm2d(cout),
            make_activation(act, delta),
            conv3x3(cout, cout),
        )
        self.shortcut = conv3x3(cin, cout, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(x)
        short = x if self.shortcut is None else self.shortcut(pre)
        return self.main(pre) + short


class PreActResNet(nn.Module):
    """Pre-activation ResNet of depth 6n+2 (three stages of n blocks).

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        width: channels of the first stage; stages use width, 2*width, 4*width.
        in_channels: 1 (grey-scale) or 3 (RGB).
        num_classes: any count >= 2.
        input_size: 28, 32, 64 or 224. Inputs of 224 get an ImageNet-style stem
            (7x7 stride-2 conv and a 3x3 stride-2 max pool) so stages see 56x56 maps.
        activation: "relu" (standard) or "hhrelu" (robust).
        mean, std: per-channel normalisation applied inside ``forward``.
        zero_init_residual: zero the last conv of every block's main branch so each block
            starts as the identity (the reference does this for standard networks only).
    """

    def __init__(
        self,
        depth: int = 44,
        width: int = 16,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        activation: str = "relu",
        hhrelu_delta: float = HHRELU_DELTA,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        zero_init_residual: bool = True,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if input_size not in (28, 32, 64, 224):
            raise ValueError(f"input_size must be 28, 32, 64 or 224, got {input_size}")
        mean = list(mean) if mean is not None else [0.5] * in_channels
        std = list(std) if std is not None else [0.25] * in_channels
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError("mean and std need one value per input channel")
        n = (depth - 2) // 6
        widths = [width, 2 * width, 4 * width]
        self.register_buffer("input_offset", torch.tensor([mean, std], dtype=torch.float32))

        if input_size >= 128:
            stem: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            stem = conv3x3(in_channels, width)
        stages = []
        cin = width
        for i, w in enumerate(widths):
            blocks = [
                PreActBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1, activation, hhrelu_delta)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.pipe = nn.Sequential(
            stem,
            *stages,
            nn.BatchNorm2d(cin),
            make_activation(activation, hhrelu_delta),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cin, num_classes, 1),
        )
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, PreActBlock):
                    nn.init.zeros_(m.main[3].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x C x H x W in [0, 1] -> logits N x num_classes."""
        mean = self.input_offset[0].view(1, -1, 1, 1)
        std = self.input_offset[1].view(1, -1, 1, 1)
        return self.pipe((x - mean) / std).flatten(1)

    @property
    def gradcam_layer(self) -> nn.Module:
        """The act after the head BN: the last spatial feature map (8x8 on 32x32 inputs)."""
        return self.pipe[5]
