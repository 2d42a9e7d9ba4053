"""Start, watch and stop worker processes (``python -m worker``); torch-free, so ``aex serve``
can use it from the API process.

Each worker runs in its own session: a Ctrl-C in the terminal reaches only the supervisor,
which then sends every worker exactly one SIGTERM (rq's warm shutdown: finish the current
job, then exit). A second signal would be rq's cold shutdown. A worker that exits on its
own while the pool runs is started again (after a short pause), so a killed or crashed
worker does not shrink the pool for good.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from jobs.settings import Settings

log = logging.getLogger("aex.pool")

RESTART_PAUSE_SECONDS = 2.0
CONFIG_ERROR_STATUS = 2  # `python -m worker` exits with 2 on an AexError (settings, checkpoints)


# The nice value of CPU workers that share the machine's cores with the API and Redis.
SHARED_CORES_NICE = 10


class WorkerPool:
    """``count`` worker processes with the given settings. ``gpus``: one CUDA device index
    per worker (sets CUDA_VISIBLE_DEVICES), or None to let each pick its device.
    ``reserve_cores``: cores the CPU workers leave to other work of this machine (``aex
    serve``'s API) when AEX_TORCH_THREADS is not set; with it, and AEX_WORKER_NICE not set,
    they also run at nice SHARED_CORES_NICE."""

    def __init__(
        self,
        settings: Settings,
        count: int,
        gpus: Sequence[int] | None = None,
        restart: bool = True,
        reserve_cores: int = 0,
    ):
        if gpus is not None and len(gpus) != count:
            raise ValueError("need one GPU index per worker")
        self.settings = settings
        self.count = count
        self.reserve_cores = reserve_cores
        self.gpus = list(gpus) if gpus is not None else None
        self.restart = restart
        self.procs: list[subprocess.Popen | None] = [None] * count
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def _env(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.as_env())
        if self.settings.torch_threads is None and self.settings.device in (None, "cpu"):
            # N CPU workers on one machine: share the cores instead of oversubscribing them.
            # torch's threads wait for one another spinning: with more runnable threads than
            # cores (the API answering while a batch computes), a pass slows down severalfold
            # (2 cores, one kept busy: cifar10-robust, a batch of 8, 150 ms on two threads,
            # 25 ms on one; alone, 17 and 24 ms).
            cores = max(1, (os.cpu_count() or 1) - self.reserve_cores)
            env["AEX_TORCH_THREADS"] = str(max(1, cores // max(1, self.count)))
        if self.settings.worker_nice is None and self.reserve_cores and self.settings.device in (None, "cpu"):
            # Sharing the cores with the API and Redis: a forward pass yields a core to their
            # short work, which is on every request's path (Settings.worker_nice).
            env["AEX_WORKER_NICE"] = str(SHARED_CORES_NICE)
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpus[index])
        env["AEX_PARENT_PID"] = str(os.getpid())  # Settings.parent_pid of the child
        return env

    def _spawn(self, index: int) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "worker"], env=self._env(index), start_new_session=True)
        log.info("started worker %d (pid %d)", index, proc.pid)
        return proc

    def start(self) -> WorkerPool:
        with self._lock:
            for i in range(self.count):
                self.procs[i] = self._spawn(i)
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="aex-worker-pool")
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                for i, proc in enumerate(self.procs):
                    if proc is None or proc.poll() is None or self._stopping.is_set():
                        continue
                    log.warning("worker %d (pid %d) exited with status %s", i, proc.pid, proc.returncode)
                    if proc.returncode == CONFIG_ERROR_STATUS:
                        # Bad settings or checkpoints: starting it again would fail the same way.
                        log.error("worker %d stopped on a configuration error; not restarting it", i)
                        self.procs[i] = None
                    elif self.restart:
                        time.sleep(RESTART_PAUSE_SECONDS)
                        if not self._stopping.is_set():
                            self.procs[i] = self._spawn(i)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    def alive(self) -> int:
        return sum(1 for p in self.procs if p is not None and p.poll() is None)

    def stop(self, timeout: float | None = None) -> list[int | None]:
        """SIGTERM every worker (warm shutdown), wait up to ``timeout`` seconds (None: as long
        as their current jobs take), then SIGKILL the rest. Returns the exit statuses."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        with self._lock:
            procs = [p for p in self.procs if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = None if timeout is None else time.monotonic() + timeout
        codes: list[int | None] = []
        for p in procs:
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                codes.append(p.wait(left))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                codes.append(p.wait())
        return codes

    def wait(self) -> None:
        """Block until stop() is called from another thread or a signal handler."""
        while not self._stopping.wait(0.5):
            pass
