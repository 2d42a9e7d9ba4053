"""The fused copy as a frozen graph (models/nn/graph.py): for every architecture of the registry and the bundled checkpoints, its oneDNN copy's logits bit for bit, and the eager copy's to float rounding with the same classes, at batch sizes other than the traced one; the eager copy kept, with the reason, where tracing fails or the graph differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models.nn.graph import graph_forward
from models.nn.inference import inference_copy
from models.nn.onednn import onednn_copy
from models.nn.registry import available
from models.store.checkpoint import load_checkpoint
from tests.models.nn.test_inference import tiny

BUNDLED = Path(__file__).resolve().parents[3] / "models" / "checkpoints"


def nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` equals ``want`` to float rounding, relative to the largest logit."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def assert_graph_is_the_copy(model: nn.Module, shape: tuple[int, int, int], batches=(1, 2, 5, 16)) -> None:
    copy = inference_copy(model)
    graph, why_not = graph_forward(copy, nhwc(torch.zeros(1, *shape)))
    assert why_not is None and isinstance(graph, torch.jit.ScriptModule), why_not
    fast = onednn_copy(copy)
    g = torch.Generator().manual_seed(3)
    for n in batches:
        x = nhwc(torch.rand(n, *shape, generator=g))
        with torch.inference_mode():
            got, want = graph(x), copy(x)
            assert torch.equal(got, fast(x)), n
            assert_logits_close(got, want)
            assert torch.equal(got.argmax(1), want.argmax(1)), n


@pytest.mark.parametrize("name", available())
def test_every_architecture_s_graph_gives_the_copy_s_logits(name):
    if name == "torchvision_resnet50":  # 25M parameters: smaller inputs, fewer batches
        assert_graph_is_the_copy(tiny(name, 3, "hhrelu"), (3, 64, 64), batches=(2, 4))
    else:
        for activation in ("relu", "hhrelu"):
            assert_graph_is_the_copy(tiny(name, 1, activation), (1, 32, 32))


@pytest.mark.parametrize("checkpoint", sorted(p.name for p in BUNDLED.iterdir() if p.is_dir()))
def test_each_bundled_checkpoint_s_graph_gives_the_copy_s_logits(checkpoint):
    model, meta = load_checkpoint(BUNDLED / checkpoint / "model.safetensors")
    assert_graph_is_the_copy(model, (meta.in_channels, meta.input_size, meta.input_size), batches=(1, 7))


class _SignBranch(nn.Module):
    """A forward whose Python branch depends on the data: a trace records one side only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3] * (2.0 if float(x.mean()) > 0.5 else -1.0)


class _DictOut(nn.Module):
    """A forward that returns a dict: a strict trace refuses it."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x.flatten(1)[:, :3]}


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the very warning of a trace that may not generalise
@pytest.mark.parametrize(
    ("module", "reason"),
    [(_SignBranch(), "differ from the eager copy's at batch"), (_DictOut(), "could not be traced")],
)
def test_a_copy_whose_graph_is_not_it_bit_for_bit_is_kept_with_the_reason(module, reason):
    example = nhwc(torch.full((1, 3, 8, 8), 0.9))  # traced on the branch the probes do not all take
    kept, why_not = graph_forward(module.eval(), example)
    assert kept is module and why_not is not None and reason in why_not, why_not
