"""Architectures created by name, so a checkpoint can rebuild its network from metadata."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from models.defaults import HHRELU_DELTA
from models.errors import UnknownArchitectureError
from models.nn.resnet import PreActResNet, make_activation

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn: Callable[..., nn.Module]):
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` with keyword arguments (those stored in checkpoints)."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise UnknownArchitectureError(f"unknown architecture {name!r}; available: {', '.join(available())}") from None
    try:
        return fn(**kwargs)
    except TypeError as exc:
        raise UnknownArchitectureError(f"bad arguments for architecture {name!r}: {exc}") from None


@register("preact_resnet")
def preact_resnet(**kwargs: Any) -> nn.Module:
    return PreActResNet(**kwargs)


def _cifar_preset(depth: int):
    def build(**kwargs: Any) -> nn.Module:
        args = dict(
            depth=depth, width=16, in_channels=3, num_classes=10, input_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD
        )
        args.update(kwargs)
        return PreActResNet(**args)

    return build


for _depth in (20, 32, 44, 56):
    register(f"resnet{_depth}_cifar")(_cifar_preset(_depth))


class _Normalized(nn.Module):
    """Wrap a network so it takes [0, 1] pixels and normalises inside ``forward``."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("input_offset", torch.tensor([list(mean), list(std)]))

    def forward(self, x):
        mean = self.input_offset[0].view(1, -1, 1, 1)
        std = self.input_offset[1].view(1, -1, 1, 1)
        return self.net((x - mean) / std)

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.net.layer4


def _swap_activations(module: nn.Module, activation: str, delta: float) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, make_activation(activation, delta))
        else:
            _swap_activations(child, activation, delta)


@register("torchvision_resnet50")
def torchvision_resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    input_size: int = 224,
    activation: str = "hhrelu",
    hhrelu_delta: float = HHRELU_DELTA,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
) -> nn.Module:
    """torchvision's ResNet-50 with every ReLU swapped for ``activation`` (for ImageNet-size
    data on GPUs). Bottlenecks reuse one ReLU module three times; swapping the module keeps
    that sharing, which is harmless because HHReLU is stateless."""
    from torchvision.models import resnet50

    net = resnet50(num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    _swap_activations(net, activation, hhrelu_delta)
    return _Normalized(
        net, mean[:in_channels] if in_channels == 1 else mean, std[:in_channels] if in_channels == 1 else std
    )
