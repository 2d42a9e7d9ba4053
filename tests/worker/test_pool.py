"""The worker pool's environment: how many torch threads CPU workers get when AEX_TORCH_THREADS is not set."""

from __future__ import annotations

import os

from jobs.settings import Settings
from worker.pool import WorkerPool


def test_cpu_workers_share_the_cores_but_those_left_to_the_api():
    settings = Settings(redis_url="unix:///nowhere", torch_threads=None, device="cpu")
    cores = os.cpu_count() or 1
    assert WorkerPool(settings, 1)._env(0)["AEX_TORCH_THREADS"] == str(cores)
    assert WorkerPool(settings, 1, reserve_cores=1)._env(0)["AEX_TORCH_THREADS"] == str(max(1, cores - 1))
    assert WorkerPool(settings, cores + 1, reserve_cores=1)._env(0)["AEX_TORCH_THREADS"] == "1"  # never none
    given = settings.model_copy(update={"torch_threads": 3})
    assert WorkerPool(given, 1, reserve_cores=1)._env(0)["AEX_TORCH_THREADS"] == "3"
