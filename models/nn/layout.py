"""The network in channels-last (NHWC) memory layout for the searches' small CPU batches.

oneDNN's CPU convolutions run faster on NHWC tensors with NHWC weights when the batch is small:
on the 2-core test machine, one forward and input-gradient step of ResNet-44 on 2 rows took
0.52x the NCHW time and on 10 rows 0.77x, but 1.6x on 64 rows (measured with
``bench/bench_all.py``'s workloads). The searches that run few rows for many steps (an
explanation's targets, the fast stability search's two rows per image) take a frozen NHWC
copy of the network (eval mode, parameters without grad), cached per model and rebuilt when
its weights change, and their input in the same layout. Results agree with NCHW to float
rounding; the exact ARA searches keep the NCHW network, so their radii do not move.

The copy handed out is the fused inference copy (``models.nn.inference``: BN folded into the
convolutions or an affine map, HHReLU's forward with one temporary fewer; its backward is
HHReLU's own): an explanation's search and the fast stability search of four images took
0.81x the CPU time of the plain NHWC copy, their radii and probabilities moving by float
rounding (1e-7)."""

from __future__ import annotations

import torch
from torch import nn

from models.nn.inference import inference_copy

# Rows up to which the NHWC copy is used on the CPU.
SMALL_BATCH = 16


def small_batch_layout(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """(network, x) to search with: the fused NHWC copy (cached per model, rebuilt when its
    weights change) and x in NHWC for a CPU batch of at most ``SMALL_BATCH`` images
    (N x C x H x W), else ``model`` and ``x`` unchanged."""
    if x.ndim != 4 or x.device.type != "cpu" or x.shape[0] > SMALL_BATCH:
        return model, x
    return inference_copy(model), x.contiguous(memory_format=torch.channels_last)
