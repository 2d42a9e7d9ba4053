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
