"""The one job service behind the routes: admission (``service.admission``), result reuse
(``service.reuse``), enqueueing, job views (``service.views``), outputs and cancelling.

Blocking Redis calls: the routes run these methods in the thread pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import uuid
from typing import Any

from redis import Redis
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result

from models.errors import (
    UnknownJobError,
)
from models.version import __version__
from service import admission
from service.catalogue import Catalogue
from service.multipart import Upload
from service.reuse import reuse_result
from service.schemas import ClassifyParams, ExplainParams, JobView
from service.views import job_view, kind_of
from worker.callbacks import notify_job_end
from worker.failures import reap_abandoned
from worker.keys import cancel_key, dicom_key, images_key, upload_key
from worker.params import classify_parameters, explain_parameters, result_cache_key
from worker.queues import JOB_FUNCTIONS, QUEUE_NAMES, SERIALIZER, JobKind
from worker.settings import Settings
from worker.states import STATUS_FROM_RQ, ApiStatus

log = logging.getLogger("aex.service")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\.png$")
DICOM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\.dcm$")


class JobService:
    """Admission, enqueueing and views of jobs on one Redis connection."""

    def __init__(self, conn: Redis, settings: Settings, catalogue: Catalogue):
        self.conn, self.settings, self.catalogue = conn, settings, catalogue
        self.queues = {k: Queue(QUEUE_NAMES[k], connection=conn, serializer=SERIALIZER) for k in JobKind}

    def submit(
        self,
        kind: JobKind,
        image: bytes,
        model: str,
        kwargs: dict[str, Any],
        meta: dict[str, Any] | None = None,
        timeout: int | None = None,
    ) -> str:
        """Store the upload (with its TTL) and enqueue the job by dotted path. Returns its id."""
        admission.check_capacity(self.conn, self.queues[kind], kind, self.settings)
        job_id = uuid.uuid4().hex
        if timeout is None:
            timeout = self.settings.classify_timeout if kind is JobKind.CLASSIFY else self.settings.explain_timeout
        self.conn.set(upload_key(job_id), image, ex=self.settings.upload_ttl)
        self.queues[kind].enqueue(
            JOB_FUNCTIONS[kind],
            kwargs={"model": model, **kwargs},
            job_id=job_id,
            job_timeout=timeout,
            result_ttl=self.settings.result_ttl,
            failure_ttl=self.settings.result_ttl,
            ttl=self.settings.upload_ttl,
            meta={"kind": kind.value, "model": model, **(meta or {})},
            description=f"{kind.value} {model}",
        )
        return job_id

    def wait(self, job_id: str, seconds: float) -> None:
        """Block until the job has a result (success, failure or stop), at most ``seconds``."""
        if seconds > 0:
            self.conn.xread({Result.get_key(job_id): "0-0"}, block=max(1, int(seconds * 1000)))

    def _cache_key(self, kind: JobKind, entry: dict[str, Any], data: bytes, parameters: dict[str, Any]) -> str:
        checkpoint = entry.get("checkpoint_sha256") or entry.get("weights_sha256") or ""
        return result_cache_key(
            kind.value, entry["name"], checkpoint, hashlib.sha256(data).hexdigest(), parameters, __version__
        )

    def _start(
        self,
        kind: JobKind,
        upload: Upload,
        entry: dict[str, Any],
        kwargs: dict[str, Any],
        meta: dict[str, Any],
        timeout: int | None = None,
    ) -> str:
        """The id of a job answering the request: a reused result, or a newly queued job."""
        key = self._cache_key(kind, entry, upload.data, kwargs)
        job_id = reuse_result(self.conn, self.queues[kind], self.settings, kind, entry["name"], key, kwargs, meta)
        if job_id is not None:
            return job_id
        if kind is JobKind.EXPLAIN:
            kwargs = {**kwargs, "result_ttl": self.settings.result_ttl}
        return self.submit(kind, upload.data, entry["name"], kwargs, {**meta, "cache_key": key}, timeout)

    # --- the two kinds of job ----------------------------------------------------------
    def classify(self, upload: Upload, params: ClassifyParams) -> JobView:
        """Check the upload, queue a classify job on the high-priority queue (or answer from
        an identical earlier one) and wait up to AEX_CLASSIFY_WAIT_SECONDS for it."""
        input_format = admission.check_input(upload, params, self.settings)
        entry = self.catalogue.resolve(self.conn, params.model)
        stability_steps = admission.stability_steps(params, self.settings) if params.stability else None
        kwargs = classify_parameters(
            params.top_k, params.stability, stability_steps or 0, params.window_center, params.window_width
        )
        meta = admission.job_meta(input_format, params, self.settings)
        # The stability searches take seconds, not milliseconds: the explain time limit.
        timeout = self.settings.explain_timeout if params.stability else None
        job_id = self._start(JobKind.CLASSIFY, upload, entry, kwargs, meta, timeout)
        self.wait(job_id, self.settings.classify_wait_seconds)
        return self.view(job_id)

    def explain(self, upload: Upload, params: ExplainParams) -> JobView:
        """Check the upload and the parameters, queue an explain job (or answer from an
        identical earlier one); returns at once."""
        input_format = admission.check_input(upload, params, self.settings)
        entry = self.catalogue.resolve(self.conn, params.model)
        layer = admission.check_explain(params, entry, self.settings)
        kwargs = explain_parameters(
            params.targets,
            params.rho,
            params.steps,
            layer,
            admission.stability_steps(params, self.settings),
            params.window_center,
            params.window_width,
        )
        job_id = self._start(
            JobKind.EXPLAIN, upload, entry, kwargs, admission.job_meta(input_format, params, self.settings)
        )
        return self.view(job_id)

    # --- reading -----------------------------------------------------------------------
    def fetch(self, job_id: str) -> Job:
        if not JOB_ID.match(job_id):
            raise UnknownJobError(f"unknown job {job_id!r}")
        try:
            return Job.fetch(job_id, connection=self.conn, serializer=SERIALIZER)
        except NoSuchJobError:
            raise UnknownJobError(f"unknown job {job_id!r} (finished jobs are kept AEX_RESULT_TTL seconds)") from None

    def view(self, job_id: str) -> JobView:
        job = self.fetch(job_id)
        kind = kind_of(job)
        started = job.get_status(refresh=False) == JobStatus.STARTED
        if started and kind is not None and job.id in self.queues[kind].started_job_registry.get_expired_job_ids():
            # Its worker died: fail it now rather than at the next worker maintenance.
            reap_abandoned(self.conn)
            job = self.fetch(job_id)
        return job_view(self.conn, job, self.queues[kind] if kind is not None else None)

    @staticmethod
    def _result_job(job: Job) -> str:
        """The job whose stored images a job shows (itself, or the one it reused)."""
        return str(job.meta.get("result_job") or job.id)

    def image(self, job_id: str, name: str) -> bytes:
        job = self.fetch(job_id)
        if not IMAGE_NAME.match(name):
            raise UnknownJobError(f"job {job_id} has no image {name!r}")
        data = self.conn.hget(images_key(self._result_job(job)), name)
        if data is None:
            raise UnknownJobError(f"job {job_id} has no image {name!r} (not finished, not an explain job, or expired)")
        return data

    def dicom(self, job_id: str, name: str) -> bytes:
        """One DICOM Secondary Capture object of a finished explain job on DICOM input."""
        job = self.fetch(job_id)
        if not DICOM_NAME.match(name):
            raise UnknownJobError(f"job {job_id} has no DICOM object {name!r}")
        data = self.conn.hget(dicom_key(self._result_job(job)), name)
        if data is None:
            raise UnknownJobError(
                f"job {job_id} has no DICOM object {name!r} (not finished, not an explain job "
                f"on DICOM input, or expired)"
            )
        return data

    # --- cancelling --------------------------------------------------------------------
    def cancel(self, job_id: str) -> JobView:
        """Cancel a queued job at once; ask a running one to stop at its next step (it then
        shows "cancelled"). A job already over is left as it is."""
        job = self.fetch(job_id)
        status = job.get_status(refresh=False)
        if STATUS_FROM_RQ.get(status) in (ApiStatus.FINISHED, ApiStatus.FAILED, ApiStatus.CANCELLED):
            return self.view(job_id)
        # The flag covers the race where a worker takes the job while we cancel it.
        self.conn.set(cancel_key(job_id), 1, ex=self.settings.result_ttl)
        if status == JobStatus.STARTED:
            # It may have stopped running meanwhile; the flag (or its end) settles it.
            with contextlib.suppress(InvalidJobOperation):
                send_stop_job_command(self.conn, job_id, serializer=SERIALIZER)
        else:
            try:
                job.cancel()
                self.conn.delete(upload_key(job_id))
                # No worker will see this job end: tell its callback here.
                notify_job_end(self.conn, job, ApiStatus.CANCELLED)
            except InvalidJobOperation:
                pass  # cancelled by another request meanwhile
        return self.view(job_id)
