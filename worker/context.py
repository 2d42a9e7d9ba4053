"""The worker context: what a worker process builds once at start (settings, data cipher, served models) and the
state its job functions share with it (the cancel event of the job in hand, the batch shares).

rq calls a job function by its dotted path with the job's keyword arguments only, so the
function reaches the worker's state through the one context installed by ``worker.run``
before the work loop (``install``, then ``current``), instead of through module globals
scattered over the worker's modules.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jobs.crypto import DataCipher
from jobs.settings import Settings

if TYPE_CHECKING:
    from worker.served import ServedModels


@dataclass
class Prepared:
    """A job's share of a batch: its result, or the error its own part raised."""

    result: Any = None
    error: BaseException | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class WorkerContext:
    """Built once per worker process (``worker.run.run_worker``)."""

    settings: Settings
    cipher: DataCipher
    served: ServedModels
    # Set when rq's stop-job command arrives for the job in hand (pubsub thread); the job's
    # progress callback turns it into JobCancelledError between two search steps.
    stop_requested: threading.Event = field(default_factory=threading.Event)
    # Each job's share of the batch it ran in, until its job function takes it.
    prepared: dict[str, Prepared] = field(default_factory=dict)
    # Seconds of each stage of a job before its computation (claim, gather, read), until its
    # job function puts them in its result's timings.
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    # What the worker read of a job with its claim (one round trip for a whole batch), until
    # its job function takes it: its sealed upload, and whether its cancel flag was set (one
    # set later is seen by the write of the job's end: ``AexWorker._finished``).
    uploads: dict[str, bytes] = field(default_factory=dict)
    cancel_flags: dict[str, bool] = field(default_factory=dict)

    def hand_over(self, prepared: dict[str, Prepared]) -> None:
        """Make each job's share available to its job function (``take_prepared``)."""
        self.prepared.update(prepared)

    def take_prepared(self, job_id: str) -> Prepared | None:
        """The job's share of the batch it ran in, once (None: it computes on its own)."""
        return self.prepared.pop(job_id, None)

    def note_timing(self, job_id: str, name: str, seconds: float) -> None:
        """Add ``seconds`` to the stage ``name`` (``claim_seconds``, ...) of job ``job_id``."""
        stages = self.timings.setdefault(job_id, {})
        stages[name] = stages.get(name, 0.0) + seconds

    def take_timings(self, job_id: str) -> dict[str, float]:
        """The job's stage timings noted so far, once."""
        return self.timings.pop(job_id, {})

    def claimed(self, job_id: str, upload: bytes | None, cancelled: bool) -> None:
        """Keep what the claim of job ``job_id`` read: its sealed upload, its cancel flag."""
        if upload is not None:
            self.uploads[job_id] = upload
        self.cancel_flags[job_id] = cancelled

    def take_upload(self, job_id: str) -> bytes | None:
        """The job's sealed upload as its claim read it, once (None: read it now)."""
        return self.uploads.pop(job_id, None)

    def take_cancel_flag(self, job_id: str) -> bool | None:
        """Whether the job's cancel flag was set when its claim read it, once (None: read it now)."""
        return self.cancel_flags.pop(job_id, None)

    def forget(self, job_ids: list[str]) -> None:
        """Drop what was not taken (a job skipped, cancelled or lost before its turn)."""
        for job_id in job_ids:
            for kept in (self.prepared, self.timings, self.uploads, self.cancel_flags):
                kept.pop(job_id, None)


_context: WorkerContext | None = None


def install(context: WorkerContext) -> WorkerContext:
    """Make ``context`` this process's (once, at start)."""
    global _context
    _context = context
    return context


def current() -> WorkerContext:
    """This process's context (a job function outside a worker process has none)."""
    if _context is None:
        raise RuntimeError("no worker context: worker.run installs it before the first job")
    return _context
