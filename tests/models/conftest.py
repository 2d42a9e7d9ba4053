"""Tiny networks for the science-core tests (CPU, milliseconds per forward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.nn.resnet import PreActResNet


def make_tiny_model(activation: str = "relu", seed: int = 0, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Depth-8, width-4 PreActResNet on 32x32 inputs with random BN statistics (so the
    residual branches and the head are not trivial), in eval mode."""
    torch.manual_seed(seed)
    model = PreActResNet(
        depth=8,
        width=4,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=32,
        activation=activation,
        zero_init_residual=False,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The test machine's two cores are shared; two OpenMP threads spinning against other
    # processes made tiny-model tests 50x slower than one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model() -> nn.Module:
    return make_tiny_model("relu")


@pytest.fixture
def tiny_hh_model() -> nn.Module:
    return make_tiny_model("hhrelu", seed=1)


@pytest.fixture
def images() -> torch.Tensor:
    """Six random images, float 6 x 3 x 32 x 32 in [0, 1]."""
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(123))
