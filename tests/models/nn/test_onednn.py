"""Convolutions through oneDNN at every batch size (models/nn/onednn.py): each plain float32 Conv2d replaced, over the same tensors, the layer's output to float rounding at batch 1 where torch's own choice is another kernel; other layers, and networks without one, left as they are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.nn.inference import inference_copy
from models.nn.onednn import OneDnnConv2d, onednn_copy
from tests.models.nn.test_graph import assert_logits_close, nhwc
from tests.models.nn.test_inference import tiny


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups", "bias"), [(1, 1, 1, 1, True), (2, 0, 1, 1, False), (1, 2, 2, 4, True)]
)
def test_a_layer_gives_the_convolution_s_output_at_every_batch_size(stride, padding, dilation, groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias).eval()
    conv = conv.to(memory_format=torch.channels_last)
    layer = OneDnnConv2d(conv)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    for n in (1, 2, 5):
        # 16 x 32 x 32 at batch 1: torch's conv2d takes its native kernel there, not oneDNN's.
        x = nhwc(torch.rand(n, 16, 32, 32))
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_the_copy_shares_the_tensors_and_replaces_every_plain_convolution():
    copy = inference_copy(tiny("resnet20_cifar", 3, "hhrelu"))
    fast = onednn_copy(copy)
    assert fast is not copy
    convs = [m for m in copy.modules() if type(m) is nn.Conv2d]
    assert convs and not [m for m in fast.modules() if type(m) is nn.Conv2d]
    assert len([m for m in fast.modules() if type(m) is OneDnnConv2d]) == len(convs)
    own = {id(t) for t in (*copy.parameters(), *copy.buffers())}
    assert {id(t) for t in (*fast.parameters(), *fast.buffers())} <= own
    # The original is left as it was.
    assert len([m for m in copy.modules() if type(m) is nn.Conv2d]) == len(convs)
    x = nhwc(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    with torch.inference_mode():
        got, want = fast(x), copy(x)
    assert_logits_close(got, want)


def test_layers_oneDNN_is_not_asked_for_are_kept():
    same = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding_mode="reflect"), nn.Flatten())
    assert onednn_copy(same.eval()) is same
    doubles = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).double().eval()
    assert onednn_copy(doubles) is doubles
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval()
    assert onednn_copy(linear) is linear
