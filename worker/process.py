"""The worker process: load every served checkpoint once, then run rq's work loop.

``AexWorker`` is rq's ``SimpleWorker`` (jobs run in the worker process itself, so the models
loaded before the loop serve every job, and CUDA works: a forked child could not use the
parent's CUDA context) with:

- cooperative cancellation: rq's stop-job command sets ``jobs.stop_requested``, which the
  job's progress callback turns into JobCancelledError between two search steps; the job
  then ends as rq's STOPPED (our "cancelled");
- a lease on the running job: a thread renews the job's entry in rq's StartedJobRegistry
  every ``job_heartbeat_ttl / 3`` seconds. A worker that dies (SIGKILL, out of memory, lost
  machine) stops renewing; once the lease has passed, the next registry clean-up (any
  worker's maintenance, or the API when a client polls the job) marks the job failed with
  code ``worker_lost``;
- short registrations (``worker_ttl``), so /readyz sees a dead worker within seconds;
- its catalogue of checkpoints published in its rq registration hash;
- job errors recorded in job.meta["error"] as {"code", "message"} for the API (also for
  abandoned jobs: the worker's exception handlers run in rq's registry clean-up);
- a finished job's result indexed under its cache key (``result_index_key``), so the API
  can answer an identical request from it;
- the job's callback (``worker.callbacks``) sent when it ends, in a thread.

SIGTERM or SIGINT: warm shutdown, the current job is finished first (rq); a second signal
stops at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
from typing import Any

from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker, WorkerStatus

from models.errors import BadParameterError, JobCancelledError
from worker import jobs
from worker.callbacks import notify_job_end
from worker.failures import job_kind, record_job_error
from worker.job_metrics import record_job
from worker.keys import CATALOGUE_FIELD, result_index_key
from worker.queues import QUEUE_NAMES, SERIALIZER, JobKind, connect
from worker.served import ServedModels, install
from worker.settings import Settings

log = logging.getLogger("aex.worker")


class AexWorker(SimpleWorker):
    """See the module docstring."""

    def __init__(
        self,
        *args,
        job_heartbeat_ttl: int = 20,
        catalogue: list[dict[str, Any]] | None = None,
        reuse_results: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.job_heartbeat_ttl = job_heartbeat_ttl
        self.reuse_results = reuse_results
        self.catalogue = catalogue or []
        self.push_exc_handler(self._record_failure)

    # --- registration and leases -------------------------------------------------------
    @property
    def dequeue_timeout(self) -> int:
        # Heartbeats happen between blocking dequeues: keep each well inside worker_ttl.
        return max(1, self.worker_ttl // 3)

    def heartbeat(self, timeout: int | None = None, pipeline=None):
        # rq adds 60 s to every registration; ours expire after worker_ttl so a dead worker
        # leaves /readyz and the catalogue quickly.
        super().heartbeat(min(timeout or self.worker_ttl, self.worker_ttl), pipeline=pipeline)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_heartbeat_ttl

    def serialize(self) -> dict:
        return {**super().serialize(), CATALOGUE_FIELD: json.dumps(self.catalogue)}

    # --- cancellation ------------------------------------------------------------------
    def kill_horse(self, sig=None):
        # SimpleWorker has no horse process: ask the running job to stop at its next step.
        jobs.stop_requested.set()

    # --- running a job -----------------------------------------------------------------
    def execute_job(self, job: Job, queue: Queue):
        jobs.stop_requested.clear()
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(
            target=self._renew_lease, args=(job, execution, done), daemon=True, name="aex-job-lease"
        )
        beat.start()
        start = time.perf_counter()
        try:
            ok = self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
        if ok:
            record_job(self.connection, job_kind(job), "finished", time.perf_counter() - start)
            self._index_result(job)
        notify_job_end(self.connection, job)  # finished, failed, timed out or cancelled
        self.set_state(WorkerStatus.IDLE)

    def _index_result(self, job: Job) -> None:
        """Point the job's cache key at it, so an identical request is answered from this
        result while it lives (the key expires with the result)."""
        key = job.meta.get("cache_key")
        if not key or not self.reuse_results:
            return
        try:
            self.connection.set(result_index_key(key), job.id, ex=job.get_result_ttl(self.default_result_ttl))
        except Exception:
            log.warning("could not index the result of job %s:\n%s", job.id, traceback.format_exc())

    def _renew_lease(self, job: Job, execution, done: threading.Event) -> None:
        interval = max(0.2, self.job_heartbeat_ttl / 3.0)
        while not done.wait(interval):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:
                log.warning("could not renew the lease of job %s:\n%s", job.id, traceback.format_exc())

    def _record_failure(self, job: Job, exc_type, exc_value, tb) -> bool:
        if isinstance(exc_value, JobCancelledError):
            # handle_job_failure marks the job rq STOPPED (our "cancelled") when this is set.
            self._stopped_job_id = job.id
        return record_job_error(job, exc_type, exc_value, tb)


def configure_torch(settings: Settings) -> None:
    """Threads, and (AEX_DETERMINISTIC) deterministic kernels, so the same input, model and
    parameters give the same numbers on a given device (cuBLAS needs its workspace setting
    before CUDA starts; ops without a deterministic kernel only warn)."""
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def cuda_devices() -> list[int]:
    """Indices of the CUDA devices this process can see (none without CUDA)."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def worker_name() -> str:
    return f"aex-{socket.gethostname()}-{os.getpid()}"


def run_worker(settings: Settings, burst: bool = False) -> bool:
    """Load the models, register, and work until SIGTERM/SIGINT (or, with ``burst``, until
    the queues are empty). Returns whether any job ran."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not settings.redis_url:
        raise BadParameterError("AEX_REDIS_URL is not set: a worker needs the Redis server of the service")
    configure_torch(settings)
    served = ServedModels.load(settings)  # before the first job: no model load per job
    install(served)
    conn = connect(settings.redis_url)
    # Classify first: a worker takes an explain job only when no classify job waits.
    queues = [
        Queue(QUEUE_NAMES[k], connection=conn, serializer=SERIALIZER) for k in (JobKind.CLASSIFY, JobKind.EXPLAIN)
    ]
    w = AexWorker(
        queues,
        name=worker_name(),
        connection=conn,
        serializer=SERIALIZER,
        worker_ttl=settings.worker_ttl,
        maintenance_interval=settings.maintenance_interval,
        default_result_ttl=settings.result_ttl,
        job_heartbeat_ttl=settings.job_heartbeat_ttl,
        catalogue=served.catalogue(),
        reuse_results=settings.reuse_results,
    )
    log.info("worker %s ready: %s on %s", w.name, ", ".join(served.models), ", ".join(q.name for q in queues))
    return w.work(burst=burst, logging_level=settings.log_level.upper())
