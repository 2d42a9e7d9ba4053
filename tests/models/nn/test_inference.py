"""The fused inference copy (models/nn/inference.py): for every architecture of the registry and the bundled checkpoints, the same logits to float rounding and the same argmax; rebuilt when the weights change; the original left as it was; its in-place HHReLU bit for bit the formula's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models.nn.hhrelu import HalfHuberReLU, _HalfHuberReLUFn
from models.nn.inference import _HalfHuberReLUInPlace, inference_copy
from models.nn.registry import available, create_model
from models.store.checkpoint import load_checkpoint
from tests.support.checkpoints import make_tiny_model

BUNDLED = Path(__file__).resolve().parents[3] / "models" / "checkpoints"
BATCHES = (1, 3, 16, 64)  # 84 inputs a pass through BATCHES


def tiny(name: str, in_channels: int, activation: str) -> nn.Module:
    """A small random instance of architecture ``name`` with non-trivial BN statistics and
    affine parameters (so folding them changes the convolutions), in eval mode."""
    torch.manual_seed(7)
    mean, std = [0.45] * in_channels, [0.25] * in_channels
    if name == "torchvision_resnet50":
        model = create_model(name, num_classes=7, in_channels=in_channels, activation=activation, mean=mean, std=std)
    else:
        args = dict(width=4, in_channels=in_channels, num_classes=7, activation=activation, mean=mean, std=std)
        if name == "preact_resnet":
            args["depth"] = 8
        model = create_model(name, **args)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.any():  # a zero-initialised residual conv
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return model.eval()


def state(model: nn.Module) -> tuple:
    """What the copy must leave alone: modes, grad flags, layouts and values."""
    return (
        [m.training for m in model.modules()],
        [(n, p.requires_grad, p.stride(), p.detach().clone()) for n, p in model.named_parameters()],
        [(n, b.stride(), b.clone()) for n, b in model.named_buffers()],
    )


def assert_state_equal(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]
    for (n, rg, st, v), (n2, rg2, st2, v2) in zip(a[1], b[1], strict=True):
        assert (n, rg, st) == (n2, rg2, st2) and torch.equal(v, v2), n
    for (n, st, v), (n2, st2, v2) in zip(a[2], b[2], strict=True):
        assert (n, st) == (n2, st2) and torch.equal(v, v2), n


def assert_same_logits(model: nn.Module, shape: tuple[int, int, int], batches=BATCHES, seed: int = 0) -> None:
    """The copy's logits equal the model's to float rounding (1e-4 of the logit scale) on
    random inputs at each batch size, with the same argmax wherever the top two logits are
    further apart than that rounding."""
    copy = inference_copy(model)
    g = torch.Generator().manual_seed(seed)
    rows = decided = 0
    for n in batches:
        x = torch.rand(n, *shape, generator=g)
        with torch.inference_mode():
            want = model(x)
            got = copy(x.contiguous(memory_format=torch.channels_last))
            again = copy(x)  # an NCHW input is served too
        atol = 1e-4 * max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
        torch.testing.assert_close(again, want, rtol=0, atol=atol)
        top2 = want.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * atol
        assert torch.equal(got.argmax(1)[clear], want.argmax(1)[clear])
        rows += n
        decided += int(clear.sum())
    assert decided >= 0.9 * rows  # the argmax check covered nearly every input


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", available())
def test_every_architecture_gives_the_same_logits_and_is_left_untouched(name, in_channels):
    activations = ["hhrelu"] if name == "torchvision_resnet50" else ["relu", "hhrelu"]
    for activation in activations:
        model = tiny(name, in_channels, activation)
        before = state(model)
        if name == "torchvision_resnet50":  # 25M parameters: fewer, smaller inputs
            assert_same_logits(model, (in_channels, 64, 64), batches=(1, 4, 16))
        else:
            assert_same_logits(model, (in_channels, 32, 32))
        assert_state_equal(state(model), before)
        copy = inference_copy(model)
        assert not copy.training and not any(p.requires_grad for p in copy.parameters())
        # BN folded or turned into an affine map, HHReLU in place where its input is a temporary.
        assert not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())
        if activation == "hhrelu" and name != "torchvision_resnet50":
            assert not any(type(m) is HalfHuberReLU for m in copy.modules())


@pytest.mark.parametrize("checkpoint", sorted(p.name for p in BUNDLED.iterdir() if p.is_dir()))
def test_each_bundled_checkpoint_gives_the_same_logits(checkpoint):
    model, meta = load_checkpoint(BUNDLED / checkpoint / "model.safetensors")
    before = state(model)
    shape = (meta.in_channels, meta.input_size, meta.input_size)
    for seed in range(3):  # 252 inputs
        assert_same_logits(model, shape, seed=seed)
    assert_state_equal(state(model), before)


def test_the_copy_is_cached_and_rebuilt_when_the_weights_change(tiny_hh_model, images):
    first = inference_copy(tiny_hh_model)
    assert inference_copy(tiny_hh_model) is first
    with torch.no_grad():
        tiny_hh_model.pipe[1][0].main[1].running_mean.add_(0.3)  # a BN folded into a conv
    second = inference_copy(tiny_hh_model)
    assert second is not first
    assert_same_logits(tiny_hh_model, (3, 32, 32), batches=(6,))
    with torch.no_grad():
        stale, fresh = first(images), second(images)
    assert not torch.allclose(stale, fresh)
    # A parameter replaced (not modified in place) is a change too.
    tiny_hh_model.pipe[7].bias = nn.Parameter(tiny_hh_model.pipe[7].bias.detach() + 1.0)
    assert inference_copy(tiny_hh_model) is not second
    assert_same_logits(tiny_hh_model, (3, 32, 32), batches=(6,))
    # load_state_dict copies into the tensors in place.
    third = inference_copy(tiny_hh_model)
    tiny_hh_model.load_state_dict(make_tiny_model("hhrelu", seed=5).state_dict())
    assert inference_copy(tiny_hh_model) is not third
    assert_same_logits(tiny_hh_model, (3, 32, 32), batches=(6,))


@pytest.mark.parametrize("delta", [0.5, 0.3, 2.0])
def test_the_in_place_hhrelu_is_bit_for_bit_the_formula(delta):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, 12, 12, generator=g) * 2 * delta
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, delta, -delta, 1e-30, 1e30])
    for t in (x, x.contiguous(memory_format=torch.channels_last), x.double()):
        want = _HalfHuberReLUFn.forward(_Ctx(), t, delta)
        with torch.inference_mode():
            got = _HalfHuberReLUInPlace(delta)(t.clone())
        assert torch.equal(got, want) and got.dtype == t.dtype
        # Recording autograd (the searches): the input is left alone, values and input
        # gradients are the Function's, bit for bit.
        a, b = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
        got = _HalfHuberReLUInPlace(delta)(a)
        assert torch.equal(got, want) and torch.equal(a.detach(), t)
        seed = torch.rand(t.shape, generator=g, dtype=t.dtype)
        (got * seed).sum().backward()
        (_HalfHuberReLUFn.apply(b, delta) * seed).sum().backward()
        assert torch.equal(a.grad, b.grad)


class _Ctx:
    """A stand-in for autograd's ctx, to call the Function's forward directly."""

    def save_for_backward(self, *tensors):
        pass


def test_hhrelu_is_not_run_in_place_on_an_input_others_read():
    # First in its Sequential, the activation reads the Sequential's input: it stays as it was.
    seq = nn.Sequential(HalfHuberReLU(0.5), nn.Conv2d(3, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    kept = x.clone()
    copy = inference_copy(seq)
    assert type(copy[0]) is HalfHuberReLU
    with torch.inference_mode():
        torch.testing.assert_close(copy(x), seq(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(x, kept)


def test_a_convolution_used_twice_is_not_folded():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    shared = nn.Sequential(nn.Sequential(conv, bn), conv)
    copy = inference_copy(shared)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), shared(x), rtol=1e-5, atol=1e-5)
    once = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3))
    assert type(inference_copy(once)[1]) is nn.Identity  # folded where used once


def test_an_input_gradient_through_the_copy_equals_the_models(tiny_hh_model, images):
    # Autograd recording: the in-place activation runs the Function (first order is enough
    # for the searches), the folded convolutions and affine maps are differentiable.
    with torch.inference_mode():  # first asked for in inference mode (classify's forward pass)
        copy = inference_copy(tiny_hh_model)
        copy(images)
    assert not any(t.is_inference() for t in (*copy.parameters(), *copy.buffers()))
    a = images.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    b = images.clone().requires_grad_(True)
    copy(a)[:, 3].sum().backward()
    tiny_hh_model(b)[:, 3].sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
