"""An explanation's stability searches on a thread of their own, beside its other phases.

The stability score of an explain job (the fast searches: about 110 forward and
input-gradient steps on two rows per image) takes most of the job, and its explanations,
Grad-CAM and faithfulness need nothing from it, nor it from them. Each step of either search
is mostly torch's operators on a few rows, which release the GIL, so on a CPU where torch
runs one thread (a worker's default on 2 cores) the two run at once on two cores, each its own
numbers exactly (rows never meet, and a thread's operators run on that thread alone). On the
2-core test machine, one image of ``cifar10-robust`` in process, one torch thread: 4.5 s one
after the other, 3.0 s side by side.

``Beside`` runs a callable (the stability reports) on its thread and ties the two phases
together as a caller needs them: one progress bar over both (``done``/``total`` added up,
reports one at a time, since a caller's callback writes to a job); the other phase stopped at
its next progress report once one of them has failed (a cancelled job, a time limit); and
whichever error came first raised once both have stopped, so no search outlives the call.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch

# Longest a waiting main thread goes without running a pending signal's handler.
JOIN_POLL_SECONDS = 0.05
# The process's signals a main thread handles (those this platform has).
_MAIN_THREAD_SIGNALS = {
    getattr(signal, name)
    for name in ("SIGALRM", "SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
}

# progress(done, total, phase): one bar over an explanation's phases ("search", then
# "stability"), whether they run one after the other or side by side.
PhaseProgress = Callable[[int, int, str], None]


def side_by_side(device: torch.device) -> bool:
    """Whether the stability searches run beside the other phases: on a CPU with at least
    twice as many cores for this process as torch has threads (else the two phases' threads
    would take cores from each other's operators)."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return device.type == "cpu" and 2 * torch.get_num_threads() <= cores


class _Abandoned(BaseException):
    """Stops a phase at its next progress report once the other has failed (a BaseException,
    so that no ``except Exception`` of a search takes it for its own failure)."""


class Beside:
    """``work(progress)`` started on a thread of its own; ``progress`` is its phase's report
    (done, total). ``search(done, total)`` is the caller's own phase's report; ``finish()``
    waits for the thread and returns ``work``'s value or raises its error. Use as a context
    manager around the caller's phase: leaving it by an exception stops the thread and waits
    for it, then raises the first error of the two."""

    def __init__(self, work: Callable[[Callable[[int, int], None]], Any], progress: PhaseProgress | None, total: int):
        self.progress = progress
        self._lock = threading.Lock()
        self._failed = threading.Event()
        self._counts = {"search": [0, 0], "stability": [0, total]}
        self._searching = True
        self._quiet = True
        self._value: Any = None
        self._error: BaseException | None = None
        # Set when ``work`` has returned or raised. Not the thread's own join(): on CPython
        # 3.11 a join interrupted by a signal's exception can leave is_alive() False while
        # the thread still runs.
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(work,), name="aex-stability", daemon=True)

    def _run(self, work: Callable[[Callable[[int, int], None]], Any]) -> None:
        # The process's signals (a job's time limit is a SIGALRM, a stop a SIGTERM) go to the
        # main thread: one taken by this thread would not wake a main thread waiting in join().
        if hasattr(signal, "pthread_sigmask"):  # POSIX
            signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)
        try:
            self._value = work(lambda done, total: self._report("stability", done, total))
        except BaseException as exc:  # handed to the caller's thread by finish()
            self._error = exc
            self._failed.set()
        finally:
            self._done.set()

    def _report(self, phase: str, done: int, total: int) -> None:
        if self._failed.is_set():
            raise _Abandoned
        with self._lock:
            self._counts[phase] = [done, total]
            if phase == "search" and done >= total:
                self._searching = False
            # Nothing is said before the search has given its total (or ended without any), so
            # the bar's total never moves.
            self._quiet = self._quiet and phase != "search"
            if self.progress is not None and not self._quiet:
                (sd, st), (bd, bt) = self._counts["search"], self._counts["stability"]
                self.progress(sd + bd, st + bt, "search" if self._searching else "stability")

    def search(self, done: int, total: int) -> None:
        """The caller's phase's progress report (raises ``_Abandoned`` once the other failed)."""
        self._report("search", done, total)

    def __enter__(self) -> Beside:
        self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            return False
        self._failed.set()  # the thread stops at its next report
        self._join()
        if isinstance(exc, _Abandoned) and self._error is not None:
            raise self._error from None  # the caller's phase stopped for the thread's error: that one counts
        return False

    def _join(self) -> None:
        # In short waits: Python runs a signal's handler in the main thread only once it wakes.
        while not self._done.wait(JOIN_POLL_SECONDS):
            pass

    def finish(self) -> Any:
        """``work``'s value, once its thread has ended (its error raised here)."""
        with self._lock:
            self._searching = self._quiet = False
        try:
            self._join()
        except BaseException:  # a time limit's signal while waiting: the thread stops too
            self._failed.set()
            self._join()
            raise
        if self._error is not None:
            raise self._error
        return self._value
