"""The worker process: rq's work loop taking jobs, each run as one fenced attempt (``jobs.lifecycle``).

``AexWorker`` is rq's ``SimpleWorker`` (jobs run in the worker process itself, so the models
loaded before the loop serve every job, and CUDA works: a forked child could not use the
parent's CUDA context). rq takes the next job from the queues (and runs the maintenance and
the registration); everything after that is aex's:

- **claim**: every job taken (alone, or the leader and its batch mates: ``worker.batch_run``)
  is claimed at once with its own attempt token and lease, so each shows ``running`` while its
  batch computes. A job no longer queued (taken twice, cancelled, ended) is skipped;
- **lease**: a thread renews every claimed attempt's lease each ``job_heartbeat_ttl / 3`` s.
  An attempt that no longer holds its job (reaped after a long outage, or lost with Redis's
  data) is stopped and writes nothing. A worker that dies stops renewing: once the leases
  have run out, the reaper (any worker's maintenance, or the API when a client polls the
  job) queues each job again for another worker (AEX_JOB_RETRIES times), then fails it
  ``worker_lost`` (``jobs.failures.reap_abandoned``);
- **run**: the job function under the job's time limit; cooperative cancellation (rq's
  stop-job command sets the context's ``stop_requested``, and the job's progress callback
  turns it into JobCancelledError between two search steps);
- **end**: written once, under the attempt's token (``jobs.lifecycle.finish`` / ``fail`` /
  ``requeue``): a late writer is refused, and an end whose reply was lost is recognised.
  The upload is deleted and the result indexed in the same transaction; the outcome is
  counted and the callback sent (signed and pinned: ``CallbackPolicy``) after it;
- **the store refusing or unreachable** (a restart, out of memory, a read-only replica, an ACL
  refusal): each command is retried for about REDIS_RETRY_SECONDS where it can be; the
  heartbeat, the maintenance and the dequeue back off and go on instead of quitting; a run
  cut short by the store is queued again like a dead worker's; an end that cannot be written
  is tried again while the lease holds, then left to the reaper;
- short registrations (``worker_ttl``), so /readyz sees a dead worker within seconds, and the
  catalogue of checkpoints in the registration, made again when Redis lost it;
- only the redacted traceback in logs and Redis (an exception's text may quote the input).

SIGTERM or SIGINT: warm shutdown, the current job (or batch) is finished first (rq); a second
signal stops at once.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rq import worker_registration
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from jobs import lifecycle
from jobs.callbacks import CallbackPolicy, notify_job_end
from jobs.failures import (
    STORE_UNAVAILABLE,
    clean_queue,
    cut_short,
    error_of,
    job_kind,
    redacted_traceback,
)
from jobs.keys import CATALOGUE_FIELD, scoped_result_index_key
from jobs.lifecycle import Attempt
from jobs.metrics import record_job
from jobs.queues import refusal
from jobs.states import ApiStatus
from models.errors import JobCancelledError, JobRefusedError
from worker.batch_run import BatchingMixin
from worker.context import WorkerContext

log = logging.getLogger("aex.worker")

# Every Redis command of a worker is retried for about this long (``jobs.queues.connect``)
# before it fails: a Redis restart pauses the worker and its job instead of failing them.
REDIS_RETRY_SECONDS = 20
# An idle worker sends a heartbeat (and registers again if Redis lost it) at least this often.
REREGISTER_WITHIN_SECONDS = 5
# The longest pause between two tries when the store refuses a worker's writes.
MAX_BACKOFF_SECONDS = 5.0


class AexWorker(BatchingMixin, SimpleWorker):
    """See the module docstring."""

    # rq's dequeue loop waits this long at most between two tries to reach Redis (rq: 60 s).
    max_connection_wait_time = 2.0

    def __init__(
        self,
        *args,
        context: WorkerContext,
        job_heartbeat_ttl: int = 20,
        catalogue: list[dict[str, Any]] | None = None,
        reuse_results: bool = True,
        job_retries: int = 0,
        callback_policy: CallbackPolicy | None = None,
        max_batch: int = 1,
        batch_wait_seconds: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.context = context
        self.max_batch, self.batch_wait_seconds = max_batch, batch_wait_seconds
        self.callback_policy = callback_policy
        self.job_heartbeat_ttl = job_heartbeat_ttl
        self.reuse_results = reuse_results
        self.job_retries = job_retries
        self.catalogue = catalogue or []
        self._running: Attempt | None = None  # the attempt being performed now

    # --- registration ------------------------------------------------------------------
    @property
    def dequeue_timeout(self) -> int:
        # Heartbeats happen between blocking dequeues: keep each well inside worker_ttl, and
        # short enough that a registration Redis lost (a restart) is made again in seconds.
        return max(1, min(self.worker_ttl // 3, REREGISTER_WITHIN_SECONDS))

    def heartbeat(self, timeout: int | None = None, pipeline=None):
        # rq adds 60 s to every registration; ours expire after worker_ttl so a dead worker
        # leaves /readyz and the catalogue quickly.
        ttl = min(timeout or self.worker_ttl, self.worker_ttl)
        if pipeline is not None:
            super().heartbeat(ttl, pipeline=pipeline)
            return
        with self._outage("sending its heartbeat"):
            self._ensure_registered()
            super().heartbeat(ttl)

    def register_birth(self):
        self._until_accepted("registering", super().register_birth)

    def _ensure_registered(self) -> None:
        """Register again (catalogue included) when Redis no longer has this worker's
        registration: Redis restarted without persistence, or stayed away longer than
        worker_ttl. (A heartbeat alone would only recreate part of the hash.)"""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hexists(self.key, "birth")
            pipe.sismember(self.redis_workers_keys, self.key)
            born, listed = pipe.execute()
        if born and listed:
            return
        log.warning("worker %s: Redis lost its registration (restarted?); registering again", self.name)
        self.last_heartbeat = now()
        with self.connection.pipeline() as pipe:
            pipe.delete(self.key)
            pipe.hset(self.key, mapping={**self.serialize(), "state": self.get_state()})
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.worker_ttl)
            pipe.execute()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_heartbeat_ttl

    def serialize(self) -> dict:
        return {**super().serialize(), CATALOGUE_FIELD: json.dumps(self.catalogue)}

    # --- riding out a store that refuses or is away --------------------------------------
    @contextmanager
    def _outage(self, doing: str) -> Iterator[None]:
        """Log the store refusing or unreachable (each command was already retried where it
        can be) and go on: what was skipped is done again at the next turn of the work loop."""
        try:
            yield
        except STORE_UNAVAILABLE as exc:
            log.warning(
                "worker %s: the store refused or was unreachable while %s (%s)", self.name, doing, type(exc).__name__
            )

    def _until_accepted(self, doing: str, call) -> Any:
        """``call()`` again, with a growing pause, until the store takes it (or a stop is asked)."""
        pause = 0.25
        while True:
            try:
                return call()
            except STORE_UNAVAILABLE as exc:
                if self._stop_requested:
                    raise
                log.warning("worker %s: the store refused %s (%s); trying again", self.name, doing, type(exc).__name__)
                time.sleep(pause)
                pause = min(MAX_BACKOFF_SECONDS, pause * 2)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """rq's loop of heartbeat, maintenance and dequeue, with aex's dequeue: every job taken
        is in an intermediate list until it is claimed (``jobs.lifecycle.take_any``), and the
        store refusing is waited out. ``timeout`` None (burst): None once the queues are empty."""
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        while True:
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            wait = 0.0 if timeout is None else float(timeout)
            taken = self._until_accepted(
                "taking a job", lambda wait=wait: lifecycle.take_any(self.connection, self._ordered_queues, wait)
            )
            if taken is not None or timeout is None:
                self.heartbeat()
                return taken

    def set_state(self, state: str, pipeline=None):
        if pipeline is not None:
            return super().set_state(state, pipeline=pipeline)
        self._state = state  # published again with the next registration if Redis is away
        with self._outage(f"setting its state to {state}"):
            super().set_state(state)

    def check_for_suspension(self, burst: bool):
        with self._outage("checking for suspension"):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self):
        with self._outage("cleaning the registries"):
            super().run_maintenance_tasks()

    def clean_registries(self):
        for queue in self.queues:
            clean_queue(self.connection, queue, self.job_retries, self.callback_policy)
            worker_registration.clean_worker_registry(queue)
        self.last_cleaned_at = now()

    # --- cancellation ------------------------------------------------------------------
    def get_current_job_id(self) -> str | None:
        running = self._running
        return running.job.id if running is not None else None

    def kill_horse(self, sig=None):
        # SimpleWorker has no horse process: ask the running job to stop at its next step.
        self.context.stop_requested.set()

    # --- taking and running jobs (alone, or a batch: worker.batch_run) ----------------
    def execute_job(self, job: Job, queue: Queue):
        self.set_state(WorkerStatus.BUSY)  # a SIGTERM from now on lets the jobs in hand finish
        leader = self._claim(job, queue)
        if leader is not None:
            attempts = [leader]
            # Leased from the leader's claim on: gathering its mates may take AEX_BATCH_WAIT_MS.
            with self._leases(attempts):
                for mate in self.gather_batch(job, queue)[1:]:
                    attempt = self._claim(mate, queue)
                    if attempt is not None:
                        attempts.append(attempt)
                try:
                    if len(attempts) > 1:
                        self.compute_batch(attempts)
                    for attempt in attempts:
                        if not attempt.lost:
                            self._run(attempt)
                finally:
                    self.context.forget([a.job.id for a in attempts])
        self.set_state(WorkerStatus.IDLE)

    def _claim(self, job: Job, queue: Queue) -> Attempt | None:
        """Claim a job just taken: refused when it is not aex's, skipped when it is no longer
        queued, left to the stranded-job clean-up when the store is away."""
        reason = refusal(job)
        if reason is not None:
            self._refuse(job, queue, reason)
            return None
        try:
            attempt = lifecycle.claim(self.connection, job, queue, self.name, self.job_heartbeat_ttl)
        except STORE_UNAVAILABLE as exc:
            log.warning(
                "job %s: not claimed, the store is away (%s); it waits to be taken again", job.id, type(exc).__name__
            )
            return None
        if attempt is None:
            log.warning("job %s taken from its queue but no longer queued; skipped", job.id)
        return attempt

    def _refuse(self, job: Job, queue: Queue, reason: str) -> None:
        """Fail a job that is not aex's without running or importing anything it names (no
        callback: its URL came from whoever forged it)."""
        log.error("job %s refused without running it: %s", job.id, reason)
        attempt = lifecycle.claim(self.connection, job, queue, self.name, self.job_heartbeat_ttl)
        if attempt is None:
            return
        error = {"code": JobRefusedError.code, "message": f"the worker refused this job: {reason}"}
        if lifecycle.fail(self.connection, attempt, error, "refused"):
            record_job(self.connection, job_kind(job), "failed", None)

    def _run(self, attempt: Attempt) -> None:
        """Perform a claimed job under its own time limit, then write its end."""
        job = attempt.job
        self.context.stop_requested.clear()
        self._running = attempt
        start = time.perf_counter()
        try:
            with self.death_penalty_class(job.timeout or Queue.DEFAULT_TIMEOUT, JobTimeoutException, job_id=job.id):
                result = job.perform()
        except BaseException:
            exc_info = sys.exc_info()
            if isinstance(exc_info[1], SystemExit | KeyboardInterrupt):
                raise  # cold shutdown: its lease runs out and it is retried elsewhere
            self._end(attempt, lambda: self._failed(attempt, exc_info), "its failure")
        else:
            self._end(attempt, lambda: self._finished(attempt, result, time.perf_counter() - start), "its result")
        finally:
            self._running = None

    def _end(self, attempt: Attempt, write, what: str) -> None:
        """Write an end, trying again while the lease holds when the store is away; an end
        that cannot be written is left to the reaper (the job is retried)."""
        for _ in range(3):
            if attempt.lost:
                log.warning("job %s: no longer held by this worker; %s is not recorded", attempt.job.id, what)
                lifecycle.discard_partial(self.connection, attempt.job)
                return
            try:
                write()
                return
            except STORE_UNAVAILABLE as exc:
                log.warning("job %s: the store refused %s (%s); trying again", attempt.job.id, what, type(exc).__name__)
                time.sleep(1.0)
        log.error("job %s: %s could not be recorded; left to its lease", attempt.job.id, what)

    def _finished(self, attempt: Attempt, result: Any, seconds: float) -> None:
        job = attempt.job
        ttl = job.get_result_ttl(self.default_result_ttl)
        if lifecycle.finish(self.connection, attempt, result, ttl, also=lambda pipe: self._index(pipe, job, ttl)):
            record_job(self.connection, job_kind(job), "finished", seconds)
            notify_job_end(self.connection, job, ApiStatus.FINISHED, policy=self.callback_policy)
        else:
            attempt.lost = True
            log.warning("job %s: ended elsewhere meanwhile (reaped, or lost by Redis); this result is dropped", job.id)
            lifecycle.discard_partial(self.connection, job)

    def _index(self, pipe, job: Job, ttl: int) -> None:
        """Point the job's cache key, within its submitter's reuse scope, at it, so an
        identical request of the same principal (or tenant) is answered from this result while
        it lives. A job without a reuse scope is not indexed."""
        key, scope = job.meta.get("cache_key"), job.meta.get("reuse_scope")
        if key and scope and self.reuse_results:
            pipe.set(scoped_result_index_key(scope, key), job.id, ex=ttl)

    def _failed(self, attempt: Attempt, exc_info) -> None:
        job, (exc_type, exc_value, _tb) = attempt.job, exc_info
        trace = redacted_traceback(*exc_info)
        log.error("worker %s: job %s failed:\n%s", self.name, job.id, trace)
        cancelled = isinstance(exc_value, JobCancelledError)
        if cut_short(exc_type) and int(job.meta.get("retried") or 0) < self.job_retries and not cancelled:
            if lifecycle.requeue(self.connection, attempt):
                record_job(self.connection, job_kind(job), "retried", None)
                log.warning("job %s: run cut short (%s); queued again", job.id, exc_type.__name__)
            return
        if lifecycle.fail(self.connection, attempt, error_of(exc_type, exc_value), trace, stopped=cancelled):
            record_job(self.connection, job_kind(job), "cancelled" if cancelled else "failed", None)
            status = ApiStatus.CANCELLED if cancelled else ApiStatus.FAILED
            notify_job_end(self.connection, job, status, policy=self.callback_policy)

    # --- leases --------------------------------------------------------------------------
    @contextmanager
    def _leases(self, attempts: list[Attempt]) -> Iterator[None]:
        """Renew the lease of every attempt in ``attempts`` (a list that may grow) in a thread
        while the block runs."""
        done = threading.Event()
        beat = threading.Thread(target=self._renew_leases, args=(attempts, done), daemon=True, name="aex-job-lease")
        beat.start()
        try:
            yield
        finally:
            done.set()
            beat.join()

    def _renew_leases(self, attempts: list[Attempt], done: threading.Event) -> None:
        interval = max(0.2, self.job_heartbeat_ttl / 3.0)
        while not done.wait(interval):
            for attempt in list(attempts):  # mates join the list while the batch gathers
                if attempt.lost:
                    continue
                try:
                    if not lifecycle.renew(self.connection, attempt, self.job_heartbeat_ttl):
                        log.warning("job %s: no longer held by this worker (reaped, or lost by Redis)", attempt.job.id)
                        if self._running is attempt:
                            self.kill_horse()
                except Exception as exc:
                    log.warning("could not renew the lease of job %s (%s)", attempt.job.id, type(exc).__name__)
            with self._outage("renewing its registration"):
                self._ensure_registered()  # seen by /readyz even while one long job runs
