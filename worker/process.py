"""The worker process: load every served checkpoint once, then run rq's work loop.

``AexWorker`` is rq's ``SimpleWorker`` (jobs run in the worker process itself, so the models
loaded before the loop serve every job, and CUDA works: a forked child could not use the
parent's CUDA context) with:

- cooperative cancellation: rq's stop-job command sets ``tasks.stop_requested``, which the
  job's progress callback turns into JobCancelledError between two search steps; the job
  then ends as rq's STOPPED (our "cancelled");
- a lease on the running job: a thread renews the job's entry in rq's StartedJobRegistry
  every ``job_heartbeat_ttl / 3`` seconds. A worker that dies (SIGKILL, out of memory, lost
  machine) stops renewing; once the lease has passed, the next registry clean-up (any
  worker's maintenance, or the API when a client polls the job) queues the job again for
  another worker (AEX_JOB_RETRIES times, ``jobs.failures``), then fails it with code
  ``worker_lost``;
- short registrations (``worker_ttl``), so /readyz sees a dead worker within seconds;
- its catalogue of checkpoints published in its rq registration hash, registered again at
  the next heartbeat when Redis lost it (a restart, with or without persistence);
- a Redis outage ridden out: each command is retried for about REDIS_RETRY_SECONDS (so a
  Redis restart pauses a running job instead of failing it), the work loop waits for Redis
  instead of quitting, and a run cut short by a longer outage is retried like a dead
  worker's; a running job that Redis lost (a restart without persistence: the API answers
  ``job_lost``) is stopped, and nothing of it is recorded;
- uploads read, and outputs stored, sealed with AEX_DATA_KEY (``jobs.crypto``): the cipher is
  built once at start, and a worker without a key refuses to start;
- the upload deleted, and the callback sent (signed and pinned: ``CallbackPolicy``), once the
  job has ended for good;
- job errors recorded in job.meta["error"] as {"code", "message"} for the API (also for
  abandoned jobs: the worker's exception handlers run in rq's registry clean-up);
- a finished job's result indexed under its cache key within the reuse scope of its
  submitter (``scoped_result_index_key``: the principal, or its tenant), so the API can answer
  an identical request of the same principal from it, and nobody else's;
- the job's callback (``jobs.callbacks``) sent when it ends, in a thread.

SIGTERM or SIGINT: warm shutdown, the current job is finished first (rq); a second signal
stops at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rq import worker_registration
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus
from rq.job_lifecycle import call_exception_handlers
from rq.queue import Queue
from rq.registry import clean_registries
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from jobs.callbacks import CallbackPolicy, notify_job_end
from jobs.failures import (
    REDIS_OUTAGE,
    discard_upload,
    job_kind,
    maintenance_lock,
    record_job_error,
    redacted_traceback,
)
from jobs.keys import CATALOGUE_FIELD, scoped_result_index_key
from jobs.metrics import record_job
from jobs.queues import refusal
from jobs.states import STATUS_FROM_RQ, TERMINAL, ApiStatus
from models.errors import JobCancelledError, JobRefusedError
from worker import tasks
from worker.batch_run import BatchingMixin
from worker.batching import requeue_stranded

log = logging.getLogger("aex.worker")

# Every Redis command of a worker is retried for about this long (``jobs.queues.connect``)
# before it fails: a Redis restart pauses the worker and its job instead of failing them.
REDIS_RETRY_SECONDS = 20
# An idle worker sends a heartbeat (and registers again if Redis lost it) at least this often.
REREGISTER_WITHIN_SECONDS = 5


class AexWorker(BatchingMixin, SimpleWorker):
    """See the module docstring."""

    # rq's dequeue loop waits this long at most between two tries to reach Redis (rq: 60 s).
    max_connection_wait_time = 2.0

    def __init__(
        self,
        *args,
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
        self.max_batch, self.batch_wait_seconds = max_batch, batch_wait_seconds
        self.callback_policy = callback_policy
        self.job_heartbeat_ttl = job_heartbeat_ttl
        self.reuse_results = reuse_results
        self.job_retries = job_retries
        self.catalogue = catalogue or []
        self._lost: set[str] = set()  # started jobs Redis lost (a restart without persistence)
        self._running_id: str | None = None  # the job being performed now
        self.push_exc_handler(self._record_failure)

    # --- registration and leases -------------------------------------------------------
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

    # --- riding out a Redis outage -----------------------------------------------------
    @contextmanager
    def _outage(self, doing: str) -> Iterator[None]:
        """Log a Redis outage (each command was already retried for REDIS_RETRY_SECONDS)
        and go on: what was skipped is done again at the next turn of the work loop."""
        try:
            yield
        except REDIS_OUTAGE as exc:
            log.warning("worker %s: Redis unreachable while %s (%s); trying again", self.name, doing, exc)

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
        # rq's, with a lock that does not outlive a holder that died or lost Redis by 15 min.
        for queue in self.queues:
            with maintenance_lock(queue) as held:
                if held:
                    clean_registries(queue, self._exc_handlers)
                    worker_registration.clean_worker_registry(queue)
                    requeue_stranded(self.connection, queue)  # rq's would fail them
        self.last_cleaned_at = now()

    # --- cancellation ------------------------------------------------------------------
    def kill_horse(self, sig=None):
        # SimpleWorker has no horse process: ask the running job to stop at its next step.
        tasks.stop_requested.set()

    # --- running a job (alone, or with its batch mates: worker.batch_run) -------------
    def execute_job(self, job: Job, queue: Queue):
        tasks.stop_requested.clear()
        self._lost.clear()
        batch = self.gather_batch(job, queue)
        if len(batch) > 1:
            self.execute_batch(batch, queue)
        elif self._admit(job):
            try:
                execution = self.prepare_execution(job)
            except REDIS_OUTAGE as exc:
                self._put_back(job, queue, exc)
            else:
                with self._leases([(job, execution)]):
                    self._run(job, queue, execution)
        self.set_state(WorkerStatus.IDLE)

    def _admit(self, job: Job) -> bool:
        """Whether ``job``, just taken from its queue, may run: one that is not aex's is
        refused (failed without running anything it names); one that is no longer queued is
        skipped."""
        reason = refusal(job)
        if reason is not None:
            self._refuse(job, reason)
            return False
        if job.get_status(refresh=False) != JobStatus.QUEUED:
            # Queued twice: the worker that lost Redis and the registry clean-up both queued
            # its cut run again. It runs elsewhere, or has ended: running it again could only
            # overwrite its end.
            log.warning("job %s taken from its queue while %s; skipped", job.id, job.get_status(refresh=False))
            return False
        return True

    def _run(self, job: Job, queue: Queue, execution) -> None:
        """Perform a started job under its own time limit, then settle its end."""
        tasks.stop_requested.clear()
        self._running_id = job.id
        start = time.perf_counter()
        try:
            ok = self.perform_job(job, queue, execution)
            self._settle(job, ok, time.perf_counter() - start)
        except REDIS_OUTAGE as exc:
            # Its end is not recorded: its lease runs out, and the registry clean-up queues it
            # again (or fails it) once Redis is back. The upload stays until then.
            log.warning("job %s: Redis unreachable while its end was recorded (%s); left to its lease", job.id, exc)
        finally:
            self._running_id = None

    @contextmanager
    def _leases(self, started: list[tuple[Job, Any]]) -> Iterator[None]:
        """Renew the lease of every started job in a thread while the block runs."""
        done = threading.Event()
        beat = threading.Thread(target=self._renew_leases, args=(started, done), daemon=True, name="aex-job-lease")
        beat.start()
        try:
            yield
        finally:
            done.set()
            beat.join()

    def _refuse(self, job: Job, reason: str) -> None:
        """Fail a job that is not aex's without running or importing anything it names (no
        callback: its URL came from whoever forged it)."""
        log.error("job %s refused without running it: %s", job.id, reason)
        job.meta["error"] = {"code": JobRefusedError.code, "message": f"the worker refused this job: {reason}"}
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job.save_meta()
            pipe.execute()
        record_job(self.connection, job_kind(job), "failed", None)
        discard_upload(self.connection, job.id)
        self.set_state(WorkerStatus.IDLE)

    def _settle(self, job: Job, ok: bool, seconds: float) -> None:
        """After a run, as Redis records the job: when it has ended for good, count it,
        delete its upload and send its callback; when it was queued again (a run cut short),
        keep the upload for the next run. (Its result was indexed as it was recorded.)"""
        if job.id in self._lost or not self.connection.hexists(job.key, "data"):
            # Redis lost it (restarted without persistence): the API answers job_lost. Remove
            # the fields this run wrote since, which no reader could use.
            log.warning("job %s: Redis lost it while it ran (restarted without persistence?)", job.id)
            self.connection.delete(job.key)
            return
        try:
            status = STATUS_FROM_RQ.get(job.get_status(refresh=True))
        except InvalidJobOperation:
            return
        if status not in TERMINAL:
            return
        if ok and status is ApiStatus.FINISHED:
            record_job(self.connection, job_kind(job), "finished", seconds)
        discard_upload(self.connection, job.id)
        # Finished, failed, timed out or cancelled.
        notify_job_end(self.connection, job, status, policy=self.callback_policy)

    def _put_back(self, job: Job, queue: Queue, exc: Exception) -> None:
        """A job taken from its queue that could not be started (Redis went away): put it
        back at the front of its queue, where it was."""
        log.warning("job %s: Redis unreachable before it started (%s); putting it back in its queue", job.id, exc)
        try:
            if job.get_status(refresh=True) == JobStatus.QUEUED:
                queue.push_job_id(job.id, at_front=True)
        except (*REDIS_OUTAGE, InvalidJobOperation):
            log.error("job %s could not be put back in its queue: it will not run", job.id, exc_info=True)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry, execution):
        # Indexed before rq records the result: a client that has seen the result and sends the
        # same request again is answered from it (an index naming a job not finished is unused).
        self._index_result(job)
        super().handle_job_success(job, queue, started_job_registry, execution)

    def _index_result(self, job: Job) -> None:
        """Point the job's cache key, within its submitter's reuse scope, at it, so an
        identical request of the same principal (or tenant) is answered from this result while
        it lives (the key expires with the result). A job without a reuse scope is not indexed."""
        key, scope = job.meta.get("cache_key"), job.meta.get("reuse_scope")
        if not key or not scope or not self.reuse_results:
            return
        try:
            ttl = job.get_result_ttl(self.default_result_ttl)
            self.connection.set(scoped_result_index_key(scope, key), job.id, ex=ttl)
        except Exception:
            log.warning("could not index the result of job %s:\n%s", job.id, traceback.format_exc())

    def _renew_leases(self, started: list[tuple[Job, Any]], done: threading.Event) -> None:
        interval = max(0.2, self.job_heartbeat_ttl / 3.0)
        while not done.wait(interval):
            for job, execution in started:
                if job.id in self._lost:
                    continue
                try:
                    if not self.connection.hexists(job.key, "data"):
                        self._lost.add(job.id)  # no need to finish what nobody can fetch
                        if job.id == self._running_id:
                            self.kill_horse()
                        continue
                    self.maintain_heartbeats(job, execution)
                except Exception:
                    log.warning("could not renew the lease of job %s:\n%s", job.id, traceback.format_exc())
            try:
                self._ensure_registered()  # seen by /readyz even while one long job runs
            except Exception:
                log.warning("could not renew the registration of %s:\n%s", self.name, traceback.format_exc())

    # --- what a failure leaves in logs and Redis --------------------------------------
    def handle_exception(self, job: Job, *exc_info):
        # rq logs the exception's whole text (and the job's arguments); a text may quote the
        # input, so only the redacted traceback is logged.
        self._last_redacted = redacted_traceback(*exc_info)
        self.log.error("Worker %s: job %s failed:\n%s", self.name, job.id, self._last_redacted)
        call_exception_handlers(self._exc_handlers, job, *exc_info)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry=None, exc_string="", execution=None):
        # rq stores exc_string in the job's hash and its failed registry: keep it redacted.
        redacted = getattr(self, "_last_redacted", "") if exc_string else exc_string
        return super().handle_job_failure(job, queue, started_job_registry, exc_string=redacted, execution=execution)

    def _record_failure(self, job: Job, exc_type, exc_value, tb) -> bool:
        if job.id in self._lost:
            return False  # stopped because Redis lost it: nothing to record
        if isinstance(exc_value, JobCancelledError):
            # handle_job_failure marks the job rq STOPPED (our "cancelled") when this is set.
            self._stopped_job_id = job.id
        return record_job_error(job, exc_type, exc_value, tb, retries=self.job_retries, policy=self.callback_policy)
