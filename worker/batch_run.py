"""A worker's dynamic batch: taking the leader's batch mates and computing their work as one batch (``AexWorker``'s part for batches).

The order of a batch (``worker.batching`` says which jobs may share one):

1. the leader comes from rq's dequeue with the jobs waiting behind it in its queue that share
   its batch (the signature written with each job, ``jobs.batches``), up to ``AEX_MAX_BATCH``,
   each taken and claimed in the same round trip (``jobs.rqueue.claiming.claim_next``):
   ``running`` under its own attempt token and lease, renewed for the whole batch, so a
   worker that dies mid-batch leaves every job of it to the same retries
   (``AEX_JOB_RETRIES``, then ``worker_lost``) as a lone job; a job that is not aex's is
   failed without running, and one whose data does not give the leader's signature computes
   alone (``batch_of``);
2. more are taken as they arrive, waiting ``AEX_BATCH_WAIT_MS`` at most
   (``worker.batching.gather_mates``), and claimed together in one round trip;
3. the work of all of them is computed at once (``worker.tasks.prepare_batch``), under the
   shortest time limit of the batch; a job whose own input fails keeps its own error; a
   failure of the whole (time limit, out of memory, every job cancelled) is logged and
   leaves each job to compute alone;
4. each job is then performed one after the other as a lone job is (its own time limit,
   its cancel flag as read with its claim, end, callback), taking its share of the batch;
   the ends of all of them are written in one round trip, a result only while its job's
   cancel flag is absent (a job cancelled while the batch computed ends cancelled:
   ``AexWorker._finished``), so no round trip of the work loop reads the flags again.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

from jobs.failures import redacted_traceback
from jobs.queues import STORE_UNAVAILABLE
from jobs.rqueue.layout import refusal
from worker import tasks
from worker.batching import batch_signature, gather_mates

if TYPE_CHECKING:
    from rq.job import Job
    from rq.queue import Queue

    from jobs.rqueue.lifecycle import Attempt

log = logging.getLogger("aex.worker")


class BatchingMixin:
    """Dynamic batching for ``AexWorker`` (which provides ``context`` and ``QueueWorker``'s API)."""

    max_batch: int = 1
    batch_wait_seconds: float = 0.0

    def batch_of(self, attempts: list[Attempt]) -> list[Attempt]:
        """Those of ``attempts`` (claimed together, the leader first) computed as one batch:
        the leader and the others whose own data gives the leader's signature (the signature
        a job was claimed by is written with it; one that does not match its data, or any job
        when batching is off, computes alone)."""
        signature = batch_signature(attempts[0].job)
        if signature is None or self.max_batch <= 1:
            return attempts[:1]
        return [a for a in attempts if batch_signature(a.job) == signature][: self.max_batch]

    def gather_more(self, job: Job, queue: Queue, have: int) -> list[Job]:
        """More mates for a batch of ``have`` jobs led by ``job``, waiting AEX_BATCH_WAIT_MS at
        most (none without a wait: every job that waited was taken with the leader)."""
        if self.max_batch <= have or self.batch_wait_seconds <= 0 or refusal(job) is not None:
            return []
        try:
            return gather_mates(self.connection, queue, job, self.max_batch - have, self.batch_wait_seconds)
        except STORE_UNAVAILABLE as exc:
            log.warning("worker %s: the store is away while gathering a batch (%s)", self.name, exc)
            return []

    def compute_batch(self, attempts: list[Attempt]) -> None:
        """Compute the work of every claimed job as one batch and hand each its share (a
        failure of the whole leaves each job to compute alone)."""
        batch = [a.job for a in attempts]
        start = time.perf_counter()
        try:
            with self.time_limit(batch):
                prepared = tasks.prepare_batch(batch, self.name)
        except Exception as exc:
            log.warning(
                "worker %s: a batch of %d jobs failed as a whole (%s); running them one by one:\n%s",
                self.name,
                len(batch),
                type(exc).__name__,
                redacted_traceback(*sys.exc_info()),
            )
            return
        log.info(
            "worker %s: %d jobs computed as one batch in %.3f s", self.name, len(batch), time.perf_counter() - start
        )
        self.context.hand_over(prepared)
