"""Fixtures of the science-core tests: tiny networks (CPU, milliseconds per forward; ``tests.support.checkpoints``), random images, one torch thread."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.support.checkpoints import make_tiny_model


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
