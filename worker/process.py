"""The worker process: rq's work loop taking jobs, each run as one fenced attempt (``jobs.rqueue.lifecycle``).

``AexWorker`` runs on the adapter's ``jobs.rqueue.worker.QueueWorker`` (rq's loop: jobs run in
the worker process itself, so the models loaded before the loop serve every job, and CUDA
works; the dequeue, the registration, the maintenance and riding out the store's refusals
are there). What it does with a job taken is here:

- **claim**: every job (alone, or the leader and its batch mates: ``worker.batch_run``) is
  taken and claimed in one round trip that also reads its upload and cancel flag
  (``jobs.rqueue.claiming.claim_next``; mates gathered later, together, the same way), each
  with its own attempt token and lease, so each shows ``running`` while its batch computes.
  A job no longer queued (taken twice, cancelled, ended) is skipped;
- **lease**: a thread renews every claimed attempt's lease each ``job_heartbeat_ttl / 3`` s.
  An attempt that no longer holds its job (reaped after a long outage, or lost with Redis's
  data) is stopped and writes nothing. A worker that dies stops renewing: once the leases
  have run out, the reaper (any worker's maintenance, or the API when a client polls the
  job) queues each job again for another worker (AEX_JOB_RETRIES times), then fails it
  ``worker_lost`` (``jobs.failures.reap_abandoned``);
- **run**: the job function under the job's time limit; cooperative cancellation (rq's
  stop-job command sets the context's ``stop_requested``, and the job's progress callback
  turns it into JobCancelledError between two search steps);
- **end**: written once, under the attempt's token (``jobs.rqueue.lifecycle.finishing`` /
  ``failing`` / ``requeueing``), the ends of a whole batch in one round trip
  (``lifecycle.write_ends``), built and written in the worker's ending thread while the next
  batch is taken and computed (``worker.ending``; the jobs stay leased until then): a late
  writer is refused, and an end whose reply was lost is recognised. A result is written
  only while the job's cancel flag is absent (checked by the write itself): a job cancelled
  while it ran, or while its end waited, ends cancelled. The upload is deleted,
  the result indexed and the outcome counted in the same transaction; the callback is sent
  (signed and pinned: ``CallbackPolicy``) after it;
- **the store refusing or unreachable** (a restart, out of memory, a read-only replica, an ACL
  refusal): each command is retried for about REDIS_RETRY_SECONDS where it can be; a run cut
  short by the store is queued again like a dead worker's; an end that cannot be written is
  tried again while the lease holds, then left to the reaper;
- only the redacted traceback in logs and Redis (an exception's text may quote the input).

SIGTERM or SIGINT: warm shutdown, the current job (or batch) is finished first (rq); a second
signal stops at once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from jobs.callbacks import CallbackPolicy, notify_job_end
from jobs.failures import (
    clean_queue,
    cut_short,
    error_of,
    job_kind,
    redacted_traceback,
)
from jobs.keys import cancel_key, dicom_key, images_key, scoped_result_index_key
from jobs.metrics import count_job, record_job
from jobs.queues import STORE_UNAVAILABLE
from jobs.rqueue import lifecycle
from jobs.rqueue.layout import refusal
from jobs.rqueue.lifecycle import Attempt
from jobs.rqueue.worker import QueueWorker
from jobs.states import ApiStatus
from models.errors import JobCancelledError, JobRefusedError
from worker.batch_run import BatchingMixin
from worker.context import WorkerContext
from worker.ending import Ender, Ending

if TYPE_CHECKING:
    from rq.job import Job
    from rq.queue import Queue

log = logging.getLogger("aex.worker")

# Every Redis command of a worker is retried for about this long (``jobs.queues.connect``)
# before it fails: a Redis restart pauses the worker and its job instead of failing them.
REDIS_RETRY_SECONDS = 20


class AexWorker(BatchingMixin, QueueWorker):
    """See the module docstring. ``connection``, ``catalogue``, ``job_heartbeat_ttl`` and rq's
    worker settings go to ``QueueWorker``."""

    def __init__(
        self,
        connection,
        *,
        context: WorkerContext,
        reuse_results: bool = True,
        job_retries: int = 0,
        callback_policy: CallbackPolicy | None = None,
        max_batch: int = 1,
        batch_wait_seconds: float = 0.0,
        **kwargs,
    ):
        super().__init__(connection, **kwargs)
        self.context = context
        self.max_batch, self.batch_wait_seconds = max_batch, batch_wait_seconds
        self.take_at_once = max(1, max_batch)  # a batch's leader and its mates that wait, in one look
        self.callback_policy = callback_policy
        self.reuse_results = reuse_results
        self.job_retries = job_retries
        self._running: Attempt | None = None  # the attempt being performed now
        # The attempts whose leases the lease thread renews (one list per batch in hand).
        self._leased: list[list[Attempt]] = []
        self._lease_lock = threading.Lock()
        self._lease_thread: threading.Thread | None = None
        self.ender = Ender()  # a batch's ends, written while the next one computes

    # --- the hooks of the rq shell ----------------------------------------------------
    def running_job_id(self) -> str | None:
        running = self._running
        return running.job.id if running is not None else None

    def stop_running(self) -> None:
        self.context.stop_requested.set()

    def clean(self, queue_name: str) -> None:
        clean_queue(self.connection, queue_name, self.job_retries, self.callback_policy)

    # --- taking and running jobs (alone, or a batch: worker.batch_run) ----------------
    def run_taken(self, job: Job, queue: Queue) -> None:
        claimed, self.claimed = self.claimed, []
        attempts = self._accept(claimed, self.claim_seconds)
        if not attempts:
            return
        # Leased from the first claim on (gathering more mates may take AEX_BATCH_WAIT_MS)
        # until their ends are written.
        self._hold(attempts)
        endings: list[Ending] = []
        ran = False
        try:
            start = time.perf_counter()
            more = self.gather_more(job, queue, len(attempts))
            gathered = time.perf_counter() - start
            attempts += self._claim_all(more, queue)
            for attempt in attempts:
                self.context.note_timing(attempt.job.id, "gather_seconds", gathered)
            batch = self.batch_of(attempts)
            if len(batch) > 1:
                self.compute_batch(batch)
            for attempt in attempts:
                if not attempt.lost:
                    endings.append(self._run(attempt))
            ran = True
        finally:
            # The ends of the whole batch in one round trip, written while the next batch is
            # taken and computed (worker.ending); when a cold shutdown cuts the batch short,
            # at once, after those handed before: what has run is recorded, the rest is left
            # to its lease.
            if ran:
                self.ender.hand(lambda: self._close(attempts, endings))
            else:
                self.ender.drain()
                self._close(attempts, endings)

    def _close(self, attempts: list[Attempt], endings: list[Ending]) -> None:
        """Write a batch's ends, then forget its jobs and stop renewing their leases."""
        try:
            self._end_all(endings)
        finally:
            self.context.forget([a.job.id for a in attempts])
            self._release(attempts)

    def teardown(self):
        self.ender.drain()  # the ends handed over are written before the worker leaves
        super().teardown()

    def _claim_all(self, jobs: list[Job], queue: Queue) -> list[Attempt]:
        """Claim jobs just taken into the queue's intermediate list (a batch's mates gathered
        while AEX_BATCH_WAIT_MS runs; one round trip for all): one no longer queued is
        skipped; when the store is away, none is claimed (each waits in its intermediate list
        to be taken again). Then ``_accept``."""
        start = time.perf_counter()
        try:
            claimed = lifecycle.claim_all(self.connection, jobs, queue, self.name, self.job_heartbeat_ttl)
        except STORE_UNAVAILABLE as exc:
            log.warning(
                "%d job(s) not claimed, the store is away (%s); they wait to be taken again",
                len(jobs),
                type(exc).__name__,
            )
            return []
        for job, attempt in zip(jobs, claimed):
            if attempt is None:
                log.warning("job %s taken from its queue but no longer queued; skipped", job.id)
        return self._accept([a for a in claimed if a is not None], time.perf_counter() - start)

    def _accept(self, claimed: list[Attempt], seconds: float) -> list[Attempt]:
        """The attempts of ``claimed`` (claimed in ``seconds``) that run: one whose job is not
        aex's is failed without running (``_refuse``); each other's upload and cancel flag,
        read with its claim, go to the worker context for its job function."""
        attempts = []
        for attempt in claimed:
            job = attempt.job
            reason = refusal(job)
            if reason is not None:
                self._refuse(attempt, reason)
                continue
            self.context.note_timing(job.id, "claim_seconds", seconds)
            self.context.claimed(job.id, attempt.upload, attempt.cancel_seen)
            attempt.upload = None  # the context holds it until the job function reads it
            attempts.append(attempt)
        return attempts

    def _refuse(self, attempt: Attempt, reason: str) -> None:
        """Fail a job that is not aex's, claimed, without running or importing anything it
        names (no callback: its URL came from whoever forged it)."""
        job = attempt.job
        log.error("job %s refused without running it: %s", job.id, reason)
        error = {"code": JobRefusedError.code, "message": f"the worker refused this job: {reason}"}
        try:
            if lifecycle.fail(self.connection, attempt, error, "refused"):
                record_job(self.connection, job_kind(job), "failed", None)
        except STORE_UNAVAILABLE as exc:
            log.warning("job %s: its refusal could not be written (%s); left to its lease", job.id, exc)

    def _run(self, attempt: Attempt) -> Ending:
        """Perform a claimed job under its own time limit; returns its end, to be written."""
        job = attempt.job
        self.context.stop_requested.clear()
        self._running = attempt
        start = time.perf_counter()
        try:
            with self.time_limit([job]):
                result = job.perform()
        except BaseException:
            exc_info = sys.exc_info()
            if isinstance(exc_info[1], SystemExit | KeyboardInterrupt):
                raise  # cold shutdown: its lease runs out and it is retried elsewhere
            return self._failed(attempt, exc_info)
        else:
            return self._finished(attempt, result, time.perf_counter() - start)
        finally:
            self._running = None

    def _end_all(self, endings: list[Ending]) -> None:
        """Write the ends of a batch in one round trip, trying again while their leases hold
        when the store is away; an end that cannot be written is left to the reaper (the job
        is retried). Each end written is followed by its own (callback, log); one refused
        (the attempt was fenced out) writes nothing more; a result refused because its job
        was cancelled meanwhile (``_finished``) is followed by the job's end as cancelled."""
        pending, tries = endings, 0
        while tries < 3:
            for ending in pending:
                if ending.attempt.lost:
                    job = ending.attempt.job
                    log.warning("job %s: no longer held by this worker; %s is not recorded", job.id, ending.what)
                    lifecycle.discard_partial(self.connection, job)
            pending = [e for e in pending if not e.attempt.lost]
            if not pending:
                return
            try:
                written = lifecycle.write_ends(self.connection, [e.end for e in pending])
            except STORE_UNAVAILABLE as exc:
                log.warning(
                    "the store refused the end of %d job(s) (%s); trying again", len(pending), type(exc).__name__
                )
                time.sleep(1.0)
                tries += 1
                continue
            cancelled = []
            for ending, ok in zip(pending, written):
                if ok is None:
                    cancelled.append(self._cancelled(ending.attempt))
                else:
                    (ending.then if ok else ending.refused)()
            if not cancelled:
                return
            pending = cancelled
        for ending in pending:
            log.error("job %s: %s could not be recorded; left to its lease", ending.attempt.job.id, ending.what)

    def _finished(self, attempt: Attempt, result: Any, seconds: float) -> Ending:
        job = attempt.job
        ttl = job.get_result_ttl(self.default_result_ttl)

        def also(pipe) -> None:
            self._index(pipe, job, ttl)
            count_job(pipe, job_kind(job), "finished", seconds)

        def lost() -> None:
            attempt.lost = True
            log.warning("job %s: ended elsewhere meanwhile (reaped, or lost by Redis); this result is dropped", job.id)
            lifecycle.discard_partial(self.connection, job)

        # Cancelled while it ran (its flag was read with its claim): the result is not
        # written and the job ends cancelled instead, decided by the write itself, atomically.
        return Ending(
            attempt,
            lambda: lifecycle.finishing(self.connection, attempt, result, ttl, also=also, unless=cancel_key(job.id)),
            "its result",
            then=lambda: notify_job_end(self.connection, job, ApiStatus.FINISHED, policy=self.callback_policy),
            refused=lost,
        )

    def _cancelled(self, attempt: Attempt) -> Ending:
        """The end of a job whose result was refused because it was cancelled meanwhile;
        what the job stored beside its result (an explain job's images and DICOM objects)
        goes with it, in the same transaction."""
        job_id = attempt.job.id
        error = JobCancelledError(f"job {job_id} was cancelled")
        return self._failed(attempt, (JobCancelledError, error, None), drop=(images_key(job_id), dicom_key(job_id)))

    def _index(self, pipe, job: Job, ttl: int) -> None:
        """Point the job's cache key, within its submitter's reuse scope, at it, so an
        identical request of the same principal (or tenant) is answered from this result while
        it lives. A job without a reuse scope is not indexed."""
        key, scope = job.meta.get("cache_key"), job.meta.get("reuse_scope")
        if key and scope and self.reuse_results:
            pipe.set(scoped_result_index_key(scope, key), job.id, ex=ttl)

    def _failed(self, attempt: Attempt, exc_info, drop: tuple[str, ...] = ()) -> Ending:
        """The end of a job whose run raised (``exc_info``): queued again when its run was cut
        short and retries are left, else failed (cancelled for JobCancelledError); the keys of
        ``drop`` deleted with the end."""
        job, (exc_type, exc_value, _tb) = attempt.job, exc_info
        trace = redacted_traceback(*exc_info)
        log.error("worker %s: job %s failed:\n%s", self.name, job.id, trace)
        cancelled = isinstance(exc_value, JobCancelledError)
        kind = job_kind(job)
        if cut_short(exc_type) and int(job.meta.get("retried") or 0) < self.job_retries and not cancelled:
            return Ending(
                attempt,
                lambda: lifecycle.requeueing(
                    self.connection, attempt, also=lambda pipe: count_job(pipe, kind, "retried", None)
                ),
                "its retry",
                then=lambda: log.warning("job %s: run cut short (%s); queued again", job.id, exc_type.__name__),
            )
        status = ApiStatus.CANCELLED if cancelled else ApiStatus.FAILED

        def also(pipe) -> None:
            count_job(pipe, kind, "cancelled" if cancelled else "failed", None)
            if drop:
                pipe.delete(*drop)

        return Ending(
            attempt,
            lambda: lifecycle.failing(
                self.connection,
                attempt,
                error_of(exc_type, exc_value),
                trace,
                stopped=cancelled,
                also=also,
            ),
            "its failure",
            then=lambda: notify_job_end(self.connection, job, status, policy=self.callback_policy),
        )

    # --- leases --------------------------------------------------------------------------
    def _hold(self, attempts: list[Attempt]) -> None:
        """Renew the lease of every attempt in ``attempts`` (a list that may grow) until
        ``_release``, in the worker's lease thread (started once: a thread started and joined
        per batch cost each lone job about 0.2 ms)."""
        with self._lease_lock:
            self._leased.append(attempts)
            if self._lease_thread is None or not self._lease_thread.is_alive():
                self._lease_thread = threading.Thread(target=self._renew_leases, daemon=True, name="aex-job-lease")
                self._lease_thread.start()

    def _release(self, attempts: list[Attempt]) -> None:
        with self._lease_lock:
            self._leased = [held for held in self._leased if held is not attempts]

    def _renew_leases(self) -> None:
        """Each ``job_heartbeat_ttl / 3`` s, renew the lease of every attempt held (a batch's
        first renewal comes within that interval of its claim, well inside its lease)."""
        interval = max(0.2, self.job_heartbeat_ttl / 3.0)
        while True:
            time.sleep(interval)
            with self._lease_lock:
                held = [attempt for attempts in self._leased for attempt in list(attempts)]
            if not held:
                continue
            for attempt in held:  # mates join a batch's list while it gathers
                if attempt.lost:
                    continue
                try:
                    if not lifecycle.renew(self.connection, attempt, self.job_heartbeat_ttl):
                        log.warning("job %s: no longer held by this worker (reaped, or lost by Redis)", attempt.job.id)
                        if self._running is attempt:
                            self.kill_horse()
                except Exception as exc:
                    log.warning("could not renew the lease of job %s (%s)", attempt.job.id, type(exc).__name__)
            try:
                with self._outage("renewing its registration"):
                    self._ensure_registered()  # seen by /readyz even while one long job runs
            except Exception as exc:  # the thread serves every later batch: it must not die of it
                log.warning("could not renew the registration of worker %s (%s)", self.name, type(exc).__name__)
