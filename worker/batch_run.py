"""A worker's dynamic batch: taking the leader's batch mates, computing their work as one batch,
then running each job through its own rq life (``AexWorker``'s part for batches).

The order of a batch (``worker.batching`` says which jobs may share one):

1. the leader comes from rq's dequeue; its mates are moved from the same queue to the queue's
   intermediate list, at most ``AEX_MAX_BATCH - 1`` of them, waiting ``AEX_BATCH_WAIT_MS`` at
   most for the next to arrive;
2. each is admitted as a lone job is (one that is not aex's is refused, one no longer queued
   skipped) and started: rq's execution record puts it in the started registry under a lease
   this worker renews for the whole batch, so a worker that dies mid-batch leaves every job
   of it to the same retries (``AEX_JOB_RETRIES``, then ``worker_lost``) as a lone job;
3. the work of all of them is computed at once (``worker.tasks.prepare_batch``),
   under the shortest time limit of the batch; a job whose own input fails keeps its own error;
   a failure of the whole (time limit, out of memory, every job cancelled) is logged and
   leaves each job to compute alone;
4. each job is then performed one after the other as a lone job is (its own time limit,
   cancel flag, result, failure, callback), taking its share of the batch.
"""

from __future__ import annotations

import logging
import sys
import time

from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException

from jobs.failures import REDIS_OUTAGE, redacted_traceback
from jobs.queues import refusal
from worker import tasks
from worker.batching import forget, gather_mates, hand_over

log = logging.getLogger("aex.worker")


class BatchingMixin:
    """Dynamic batching for ``AexWorker`` (which provides ``_admit``, ``_run``, ``_leases``,
    ``_put_back`` and rq's worker API)."""

    max_batch: int = 1
    batch_wait_seconds: float = 0.0

    def gather_batch(self, job: Job, queue: Queue) -> list[Job]:
        """The leader and the mates taken for it (just the leader when batching is off, or the
        leader runs alone)."""
        if self.max_batch <= 1 or refusal(job) is not None:
            return [job]
        try:
            mates = gather_mates(self.connection, queue, job, self.max_batch, self.batch_wait_seconds)
        except REDIS_OUTAGE as exc:
            log.warning("worker %s: Redis unreachable while gathering a batch (%s); running one job", self.name, exc)
            return [job]
        return [job, *mates]

    def execute_batch(self, batch: list[Job], queue: Queue) -> None:
        started = []
        for job in batch:
            if self._admit(job):
                try:
                    execution = self.prepare_execution(job)
                except REDIS_OUTAGE as exc:
                    self._put_back(job, queue, exc)
                    self._leave_intermediate(queue, job)
                    continue
                started.append((job, execution))
            # Started (in the started registry) or refused: out of rq's intermediate list
            # (a mate still there would be failed as "stuck" by rq's clean-up).
            self._leave_intermediate(queue, job)
        if not started:
            return
        with self._leases(started):
            try:
                self._compute(job for job, _ in started)
                for job, execution in started:
                    self._run(job, queue, execution)
            finally:
                forget([job.id for job, _ in started])

    def _compute(self, batch) -> None:
        batch = list(batch)
        timeout = min(job.timeout or Queue.DEFAULT_TIMEOUT for job in batch)
        start = time.perf_counter()
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=batch[0].id):
                prepared = tasks.prepare_batch(batch, self.name)
        except REDIS_OUTAGE:
            raise
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
        hand_over(prepared)

    def _leave_intermediate(self, queue: Queue, job: Job) -> None:
        try:
            self.connection.lrem(queue.intermediate_queue_key, 1, job.id)
        except REDIS_OUTAGE:
            log.warning("job %s: could not be removed from the intermediate list of %s", job.id, queue.name)
