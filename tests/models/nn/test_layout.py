"""The channels-last copy for small CPU batches (models/nn/layout.py): used up to SMALL_BATCH rows only, frozen, cached per model, rebuilt when the weights change, and equal to the NCHW network to float rounding."""

from __future__ import annotations

import torch

from models.nn.layout import SMALL_BATCH, small_batch_layout


def is_nhwc(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_a_small_cpu_batch_gets_a_frozen_nhwc_copy_that_agrees(tiny_model, images):
    net, x = small_batch_layout(tiny_model, images)
    assert net is not tiny_model and is_nhwc(x) and torch.equal(x, images)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    kernels = [p for p in net.parameters() if p.ndim == 4]  # the convolutions' weights too
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert any(is_nhwc(p) for p in kernels if p.shape[-1] > 1)  # (a 1 x 1 kernel is both)
    assert tiny_model.training is False and all(p.requires_grad for p in tiny_model.parameters())  # untouched
    with torch.no_grad():
        torch.testing.assert_close(net(x), tiny_model(images), rtol=1e-5, atol=1e-5)
    # An input gradient through the copy equals the NCHW network's.
    a = x.clone().requires_grad_(True)
    b = images.clone().requires_grad_(True)
    net(a)[:, 3].sum().backward()
    tiny_model(b)[:, 3].sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_large_batches_other_shapes_and_other_devices_keep_the_model(tiny_model):
    big = torch.rand(SMALL_BATCH + 1, 3, 32, 32)
    assert small_batch_layout(tiny_model, big) == (tiny_model, big)
    flat = torch.rand(4, 3 * 32 * 32)
    net, x = small_batch_layout(tiny_model, flat)
    assert net is tiny_model and x is flat
    meta = torch.rand(2, 3, 32, 32, device="meta")  # not the CPU: as a CUDA batch would
    net, x = small_batch_layout(tiny_model, meta)
    assert net is tiny_model and x is meta
    net, _ = small_batch_layout(tiny_model, torch.rand(SMALL_BATCH, 3, 32, 32))
    assert net is not tiny_model  # SMALL_BATCH rows still count as small


def test_the_copy_is_cached_per_model_and_rebuilt_when_its_weights_change(tiny_model, tiny_hh_model, images):
    first, _ = small_batch_layout(tiny_model, images)
    again, _ = small_batch_layout(tiny_model, images[:2])
    assert again is first
    other, _ = small_batch_layout(tiny_hh_model, images)
    assert other is not first  # one copy per model
    with torch.no_grad():
        next(tiny_model.parameters()).mul_(2.0)  # changed in place: the cached copy is stale
    rebuilt, x = small_batch_layout(tiny_model, images)
    assert rebuilt is not first
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), tiny_model(images), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(first(x), tiny_model(images), atol=1e-5)
