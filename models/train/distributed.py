"""The trainer under ``torchrun``: joining the process group, summing and averaging over
ranks, and the device each rank trains on. With ``WORLD_SIZE`` unset (one process) every
helper is a no-op, so the same training code runs with and without DDP."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from models.nn.runtime import pick_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_buffers(net: nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over all ranks, so
    every rank ends the epoch with the same network."""
    if not info.enabled:
        return
    for buf in net.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(info.world)


def rank_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``runtime.pick_device(name)`` (the shared choice: ``name``, else CUDA when present,
    else CPU), except that under torchrun (``WORLD_SIZE`` > 1) an unindexed CUDA device
    becomes ``cuda:<local_rank>``: each rank of a node must train on its own GPU, which the
    inference-side ``pick_device`` (one process, one device) has no notion of."""
    dev = pick_device(name)
    if dev.type == "cuda" and dev.index is None:
        # An explicit index also for one process: torch.cuda.set_device refuses a bare "cuda".
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        dev = torch.device("cuda", local_rank if multi else torch.cuda.current_device())
    return dev
