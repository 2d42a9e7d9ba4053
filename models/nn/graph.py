"""The fused copy's forward pass as a frozen TorchScript graph, for classify on the CPU: the same kernels, run from C++ with no Python between layers.

``graph_forward(copy, example)`` traces an inference copy (``models.nn.inference``) under
``torch.inference_mode`` and freezes it (weights become constants of the graph). Python calls
every module and dispatches every operator of an eager forward pass one by one: for a
ResNet-44 on 32 x 32 inputs that overhead is about a third of a batch of 1's time, a sixth of a
batch of 16's, and it holds the GIL the worker's other threads wait for. The graph runs the
very operators in the same order, so its logits are the eager copy's bit for bit; that is
checked when it is made, on batches of other sizes than the traced one (a traced graph takes
any batch size), and where it does not hold, or tracing fails, the eager copy is used and the
reason given. CPU ms per image of ``cifar10-robust``, one torch thread, eager copy -> graph
(``bench/bench_inference.py``, 2-core machine, indicative): batch 1 4.30 -> 3.15, batch 4
2.65 -> 2.13, batch 16 2.23 -> 1.97.

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

# Batch sizes the graph is checked on against the eager copy (other than the traced one's).
PROBE_BATCHES = (3, 16)


def graph_forward(copy: nn.Module, example: torch.Tensor) -> tuple[nn.Module, str | None]:
    """``copy`` (an eval-mode inference copy) as a frozen TorchScript graph traced on
    ``example`` (float N x C x H x W, the layout the caller will pass), and None; or ``copy``
    itself and why, when tracing fails or the graph's logits differ from the copy's on a probe
    batch (any bit). Call the graph under ``torch.inference_mode`` only."""
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
            graph = torch.jit.freeze(torch.jit.trace(copy, example, check_trace=False).eval())
            generator = torch.Generator().manual_seed(0)
            for batch in (example.shape[0], *PROBE_BATCHES):
                probe = torch.rand((batch, *example.shape[1:]), generator=generator, dtype=example.dtype)
                probe = probe.contiguous(memory_format=torch.channels_last) if probe.ndim == 4 else probe
                want = copy(probe)
                # Twice each: the graph executor optimises a graph after its first runs.
                for _ in range(2):
                    if not torch.equal(graph(probe), want):
                        return copy, f"its traced graph's logits differ from the eager copy's at batch {batch}"
    except Exception as exc:
        return copy, f"it could not be traced ({type(exc).__name__}: {str(exc)[:200]})"
    return graph, None
