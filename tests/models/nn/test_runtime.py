"""Eval mode for the duration of a block (``models.nn.runtime.eval_mode``): every module in eval inside, each
module's own flag back afterwards."""

from __future__ import annotations

from torch import nn

from models.nn.runtime import eval_mode


def test_eval_mode_switches_every_module_and_restores_each_ones_flag():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    model.train()
    model[2][1].eval()  # a submodule kept in eval on purpose (a frozen BN)
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    model.eval()  # a served model: in eval already, and left so
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())


def test_deterministic_kernels_leave_fresh_memory_unfilled_and_the_numbers_equal():
    """Deterministic kernels without torch's NaN fill of fresh allocations: the fill is a
    debugging aid that costs a forward pass up to 15% and changes no result."""
    import torch

    from models.nn.runtime import deterministic_kernels

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).eval()
    x = torch.rand(2, 3, 8, 8)
    loose = net(x)
    try:
        deterministic_kernels(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
        assert torch.equal(net(x), loose)
    finally:
        deterministic_kernels(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory
