"""The fused copy's forward pass as a frozen TorchScript graph, for classify on the CPU: oneDNN's convolutions at every batch size, run from C++ with no Python between layers.

``graph_forward(copy, example)`` traces an inference copy (``models.nn.inference``) under
``torch.inference_mode``, its convolutions called through oneDNN at every batch size
(``models.nn.onednn``: torch's own choice at batch 1 is a slower kernel), and freezes it
(weights become constants of the graph). Python calls every module and dispatches every
operator of an eager forward pass one by one: for a ResNet-44 on 32 x 32 inputs that overhead
is about a third of a batch of 1's time, a sixth of a batch of 16's, and it holds the GIL the
worker's other threads wait for. The graph runs the very operators of that oneDNN copy in the
same order, so its logits are that copy's bit for bit, and the fused copy's to float rounding;
both are checked when it is made, on batches of other sizes than the traced one (a traced
graph takes any batch size), and where either does not hold, or tracing fails, the eager copy
is used and the reason given. CPU ms per image of ``cifar10-robust``, one torch thread, eager
copy -> graph (``bench/bench_inference.py``, 2-core machine, indicative): batch 1 4.30 -> 3.15
(2.5 with oneDNN's convolutions), batch 4 2.65 -> 2.13, batch 16 2.23 -> 1.97.

The graph is for no-grad inference only: it was recorded with the in-place HHReLU branch that
runs where autograd does not record (``models.nn.inference._HalfHuberReLUInPlace``). The
searches of an explain job (input gradients) keep the eager copy.

``torch.jit`` is deprecated in favour of ``torch.compile`` and ``torch.export``, both of which
compile kernels with a C++ toolchain at load and change the arithmetic (fused kernels); the
trace needs neither, so it is kept while torch ships it, its deprecation warnings silenced here
only, and the eager copy takes over the day it is gone.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from models.nn.onednn import onednn_copy

# Batch sizes the graph is checked on against the eager copy (other than the traced one's).
PROBE_BATCHES = (3, 16)
# How far the oneDNN copy's logits may be from the fused copy's, relative to the largest:
# another kernel's summation order (about 1e-7 on cifar10-robust), not another function.
ROUNDING = 1e-4


def graph_forward(copy: nn.Module, example: torch.Tensor) -> tuple[nn.Module, str | None]:
    """``copy`` (an eval-mode inference copy) as a frozen TorchScript graph of its oneDNN copy
    (``models.nn.onednn``) traced on ``example`` (float N x C x H x W, the layout the caller
    will pass), and None; or ``copy`` itself and why, when tracing fails, the graph's logits
    differ from the oneDNN copy's on a probe batch (any bit), or those differ from ``copy``'s
    by more than float rounding. Call the graph under ``torch.inference_mode`` only."""
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
            traced = onednn_copy(copy)
            graph = torch.jit.freeze(torch.jit.trace(traced, example, check_trace=False).eval())
            generator = torch.Generator().manual_seed(0)
            for batch in (example.shape[0], *PROBE_BATCHES):
                probe = torch.rand((batch, *example.shape[1:]), generator=generator, dtype=example.dtype)
                probe = probe.contiguous(memory_format=torch.channels_last) if probe.ndim == 4 else probe
                want = traced(probe)
                # Twice each: the graph executor optimises a graph after its first runs.
                for _ in range(2):
                    if not torch.equal(graph(probe), want):
                        return copy, f"its traced graph's logits differ from the eager copy's at batch {batch}"
                if traced is not copy:
                    reference = copy(probe)
                    if float((want - reference).abs().max()) > ROUNDING * max(1.0, float(reference.abs().max())):
                        return copy, f"its oneDNN convolutions' logits differ from the eager copy's at batch {batch}"
    except Exception as exc:
        return copy, f"it could not be traced ({type(exc).__name__}: {str(exc)[:200]})"
    return graph, None
