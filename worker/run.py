"""Starting a worker process: torch's threads and determinism, the models loaded once, the
data cipher, the worker context, the Redis connection and the queues, then rq's work loop (``AexWorker``)."""

from __future__ import annotations

import logging
import os
import socket

from jobs.callbacks import CallbackPolicy
from jobs.crypto import cipher_from_settings
from jobs.queues import QUEUE_NAMES, JobKind, check_store_policy, connect
from jobs.settings import Settings
from models.errors import BadParameterError
from worker.context import WorkerContext
from worker.context import install as context_install
from worker.process import REDIS_RETRY_SECONDS, AexWorker
from worker.served import ServedModels

log = logging.getLogger("aex.worker")


def configure_torch(settings: Settings) -> None:
    """Threads, and (AEX_DETERMINISTIC) deterministic kernels, so the same input, model and
    parameters give the same numbers on a given device (cuBLAS needs its workspace setting
    before CUDA starts; ops without a deterministic kernel only warn)."""
    import torch

    from models.nn.runtime import deterministic_kernels

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        deterministic_kernels(True)


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
    # Before anything is loaded: a worker without AEX_DATA_KEY (or with a malformed one) stops here.
    cipher = cipher_from_settings(settings.data_key)
    conn = connect(settings.redis_url, retry_seconds=REDIS_RETRY_SECONDS)
    check_store_policy(conn)  # a Redis that evicts keys would lose jobs silently: refused before the models load
    policy = CallbackPolicy.from_settings(settings)
    configure_torch(settings)
    served = ServedModels.load(settings)  # before the first job: no model load per job
    context = context_install(WorkerContext(settings=settings, cipher=cipher, served=served))
    w = AexWorker(
        conn,
        context=context,
        name=worker_name(),
        worker_ttl=settings.worker_ttl,
        maintenance_interval=settings.maintenance_interval,
        default_result_ttl=settings.result_ttl,
        job_heartbeat_ttl=settings.job_heartbeat_ttl,
        catalogue=served.catalogue(),
        queue_names=[QUEUE_NAMES[JobKind(kind)] for kind in settings.queues],
        reuse_results=settings.reuse_results,
        job_retries=settings.job_retries,
        callback_policy=policy,
        max_batch=settings.max_batch,
        batch_wait_seconds=settings.batch_wait_ms / 1000.0,
    )
    log.info("worker %s ready: %s on %s", w.name, ", ".join(served.models), ", ".join(w.queue_names()))
    return w.work(burst=burst, logging_level=settings.log_level.upper())
