"""Job functions, enqueued by dotted path ("worker.jobs.classify", "worker.jobs.explain").

Each takes small JSON-safe keyword arguments; the uploaded image is read from Redis (the API
stored it under ``upload_key(job_id)``) and deleted when the job ends. Results: the return
value (JSON, kept by rq for the result TTL) and, for explanations, PNGs in a Redis hash.
Models come from the process's ``ServedModels``, loaded once before the work loop.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from rq import get_current_job
from rq.job import Job

from aex.errors import BadParameterError, JobCancelledError
from models.explain import explain_image
from models.preprocess import load_image_for_model
from models.runtime import eval_mode

from .protocol import cancel_key, images_key, upload_key
from .served import served_models

# Set by the worker when rq's stop-job command arrives for the job in hand (pubsub thread).
stop_requested = threading.Event()

PROGRESS_EVERY_SECONDS = 0.2


def _current_job() -> Job:
    job = get_current_job()
    if job is None:
        raise RuntimeError("worker.jobs functions run inside an rq job")
    return job


def _check_cancelled(job: Job) -> None:
    if stop_requested.is_set() or job.connection.exists(cancel_key(job.id)):
        raise JobCancelledError(f"job {job.id} was cancelled")


def _read_upload(job: Job) -> bytes:
    data = job.connection.get(upload_key(job.id))
    if data is None:
        raise BadParameterError("the uploaded image expired before a worker took the job (raise AEX_UPLOAD_TTL)")
    return data


class _Progress:
    """progress(done, total) for the search: writes job.meta["progress"] at most every
    PROGRESS_EVERY_SECONDS (and at the end), and stops the job when it was cancelled."""

    def __init__(self, job: Job, phase: str):
        self.job, self.phase, self.last = job, phase, 0.0

    def __call__(self, done: int, total: int) -> None:
        _check_cancelled(self.job)
        t = time.monotonic()
        if done >= total or t - self.last >= PROGRESS_EVERY_SECONDS:
            self.last = t
            self.job.meta["progress"] = {"done": int(done), "total": int(total), "phase": self.phase}
            self.job.save_meta()


def classify(model: str, top_k: int = 5) -> dict[str, Any]:
    """Class probabilities of the uploaded image under ``model``."""
    job = _current_job()
    start = time.perf_counter()
    try:
        _check_cancelled(job)
        served = served_models().get(model)
        x = load_image_for_model(_read_upload(job), served.meta.input_size, served.meta.in_channels)
        with eval_mode(served.model), torch.no_grad():
            probs = served.model(x.unsqueeze(0).to(served.device)).softmax(1)[0].cpu()
        classes = served.meta.classes
        order = probs.argsort(descending=True).tolist()
        top = [{"class_index": i, "class_name": classes[i], "prob": float(probs[i])}
               for i in order[: max(1, min(top_k, len(classes)))]]
        return {
            "model": model,
            "predicted": top[0],
            "top": top,
            "probs": {c: float(p) for c, p in zip(classes, probs.tolist())},
            "seconds": time.perf_counter() - start,
        }
    finally:
        job.connection.delete(upload_key(job.id))


def explain(
    model: str,
    targets: list[str],
    rho: float,
    steps: int,
    layer: str | None = None,
    result_ttl: int = 3600,
) -> dict[str, Any]:
    """Adversarial explanations for ``targets`` and Grad-CAM of the predicted class.

    The PNGs (input, gradcam, gradcam_overlay, one per target and its amplified difference)
    go to the hash ``images_key(job_id)`` with ``result_ttl``; the summary is returned."""
    job = _current_job()
    start = time.perf_counter()
    try:
        _check_cancelled(job)
        served = served_models().get(model)
        x = load_image_for_model(_read_upload(job), served.meta.input_size, served.meta.in_channels)
        summary, files = explain_image(
            served.model, served.meta.classes, x, targets, layer=layer, rho=rho, steps=steps,
            progress=_Progress(job, "search"), extra_summary={"model": model})
        _check_cancelled(job)
        with job.connection.pipeline() as pipe:
            pipe.hset(images_key(job.id), mapping=files)
            pipe.expire(images_key(job.id), result_ttl)
            pipe.execute()
        summary["seconds"] = time.perf_counter() - start
        return summary
    finally:
        job.connection.delete(upload_key(job.id))
