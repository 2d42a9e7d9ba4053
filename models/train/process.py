"""Process-wide torch settings a training run needs, set for the run and restored after it.

``torch.set_flush_denormal``, ``torch.set_num_threads`` and
``torch.use_deterministic_algorithms`` change the whole process, not one run: left on after
``train()`` returns, flushing subnormals breaks any later code in the same process that relies
on IEEE-754 floats (hypothesis refuses to generate floats once the FTZ/DAZ flags are set, and
NumPy's tiny values turn to zero). So the trainer sets them inside ``training_settings`` and
the previous state comes back when the run ends, normally or by an exception."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from models.nn.runtime import deterministic_kernels


def flushing_denormals() -> bool:
    """Whether the CPU flushes subnormal floats to zero now (FTZ/DAZ set). torch has no getter,
    so this reads the effect: the smallest float32 subnormal survives a multiply by one only
    when subnormals are kept."""
    tiny = torch.tensor([1e-45], dtype=torch.float32)  # the smallest positive float32 subnormal
    return bool((tiny * 1.0)[0] == 0)


@contextmanager
def training_settings(*, threads: int | None = None, deterministic: bool = False) -> Iterator[None]:
    """Within the block: subnormal floats flushed to zero (tiny gradients late in a schedule
    slow x86 CPUs several-fold), ``threads`` intra-op threads when given, deterministic
    algorithms (warn only) when asked. Each setting is put back as it was on exit."""
    old_flush = flushing_denormals()
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.set_flush_denormal(True)
        if threads:
            torch.set_num_threads(threads)
        if deterministic:
            deterministic_kernels(True)
        yield
    finally:
        torch.set_flush_denormal(old_flush)
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_det_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill
