"""The worker pool's environment: how many torch threads CPU workers get when AEX_TORCH_THREADS is not set, and at
which nice value they run when AEX_WORKER_NICE is not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jobs.settings import Settings
from worker.pool import SHARED_CORES_NICE, WorkerPool


def test_cpu_workers_share_the_cores_but_those_left_to_the_api():
    settings = Settings(redis_url="unix:///nowhere", torch_threads=None, device="cpu")
    cores = os.cpu_count() or 1
    assert WorkerPool(settings, 1)._env(0)["AEX_TORCH_THREADS"] == str(cores)
    assert WorkerPool(settings, 1, reserve_cores=1)._env(0)["AEX_TORCH_THREADS"] == str(max(1, cores - 1))
    assert WorkerPool(settings, cores + 1, reserve_cores=1)._env(0)["AEX_TORCH_THREADS"] == "1"  # never none
    given = settings.model_copy(update={"torch_threads": 3})
    assert WorkerPool(given, 1, reserve_cores=1)._env(0)["AEX_TORCH_THREADS"] == "3"


def test_cpu_workers_sharing_the_cores_with_the_api_run_at_a_higher_nice_value():
    settings = Settings(redis_url="unix:///nowhere", device="cpu")
    assert WorkerPool(settings, 1, reserve_cores=1)._env(0)["AEX_WORKER_NICE"] == str(SHARED_CORES_NICE)
    assert "AEX_WORKER_NICE" not in WorkerPool(settings, 1)._env(0)  # `aex worker`: a machine of its own
    on_gpu = settings.model_copy(update={"device": "cuda"})
    assert "AEX_WORKER_NICE" not in WorkerPool(on_gpu, 1, reserve_cores=1)._env(0)
    given = settings.model_copy(update={"worker_nice": 3})
    assert WorkerPool(given, 1, reserve_cores=1)._env(0)["AEX_WORKER_NICE"] == "3"


@pytest.mark.parametrize("start, asked", [(0, 7), (12, 7), (0, None), (0, 0)])
def test_a_worker_s_threads_run_at_its_nice_value_never_below_where_it_started(start, asked):
    """``lower_priority``: a thread running before it and one started after it both have the
    value (Linux keeps one per thread); a process may not lower its own without privileges."""
    code = f"""
import os, threading
from worker.__main__ import lower_priority
seen, go = [], threading.Event()
def before():
    go.wait()
    seen.append(os.getpriority(os.PRIO_PROCESS, 0))
early = threading.Thread(target=before)
early.start()
lower_priority({asked!r})
go.set(); early.join()
late = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
late.start(); late.join()
print(os.getpriority(os.PRIO_PROCESS, 0), *seen)
"""
    started = min(19, os.getpriority(os.PRIO_PROCESS, 0) + start)  # the tests may run niced themselves
    runs_at = max(started, asked or 0)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, preexec_fn=lambda: os.nice(start)
    ).stdout.split()
    assert out == [str(runs_at)] * 3
