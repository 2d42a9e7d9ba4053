"""The API's side of the queue: served models, admission, enqueueing, job views, cancelling.

Blocking Redis calls: the routes run these methods in the thread pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result

from models.errors import (
    BadParameterError,
    CheckpointError,
    QueueFullError,
    ServiceUnavailableError,
    UnknownJobError,
    UnknownModelError,
)
from models.explain.targets import count_rows, parse_targets
from models.store.discovery import catalogue_entry, discover_checkpoints
from models.store.header import read_checkpoint_metadata
from models.version import __version__
from service.schemas import ClassifyParams, CommonParams, ErrorBody, ExplainParams, JobView, Progress, Timings
from service.uploads import Upload, check_dicom, check_image, is_dicom_upload
from worker.callbacks import callback_meta, check_callback_url, delivery_record, notify_job_end
from worker.failures import reap_abandoned
from worker.job_metrics import record_job
from worker.keys import cancel_key, dicom_key, images_key, result_index_key, upload_key
from worker.params import classify_parameters, explain_parameters, result_cache_key
from worker.queues import JOB_FUNCTIONS, QUEUE_NAMES, SERIALIZER, JobKind, live_worker_keys, published_catalogue
from worker.settings import Settings
from worker.states import STATUS_FROM_RQ, ApiStatus

log = logging.getLogger("aex.service")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\.png$")
DICOM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\.dcm$")
# A reused result must outlive the answer by at least this long to be worth reusing.
MIN_REUSE_TTL_SECONDS = 5


class Catalogue:
    """The served models, as the live workers published them (cached a moment); when no
    worker has published yet, read from the checkpoint headers in the settings' folders."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._at = 0.0
        self._models: dict[str, dict[str, Any]] = {}

    def models(self, conn: Redis) -> dict[str, dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._at > self.settings.catalogue_cache_seconds or not self._models:
                self._models = published_catalogue(conn) or self._from_files()
                self._at = time.monotonic()
            return self._models

    def _from_files(self) -> dict[str, dict[str, Any]]:
        out = {}
        try:
            paths = discover_checkpoints(self.settings.checkpoint_dirs())
        except CheckpointError as exc:
            log.error("cannot list checkpoints: %s", exc.message)
            return {}
        for name, path in paths.items():
            try:
                out[name] = {**catalogue_entry(name, path, read_checkpoint_metadata(path)), "workers": 0}
            except CheckpointError as exc:
                log.error("skipping %s in the model list: %s", path, exc.message)
        return out

    def resolve(self, conn: Redis, name: str | None) -> dict[str, Any]:
        """The entry of model ``name`` (None: AEX_DEFAULT_MODEL, else the first by name)."""
        models = self.models(conn)
        if not models:
            raise ServiceUnavailableError(
                "no models are served (no worker has published any and no checkpoint was found)"
            )
        name = name or self.settings.default_model or sorted(models)[0]
        if name not in models:
            raise UnknownModelError(f"unknown model {name!r}; served: {', '.join(sorted(models))}")
        return models[name]


def check_targets(targets: list[str], entry: dict[str, Any], max_rows: int) -> None:
    """400 for a target the workers would refuse (the one grammar, ``models.explain.targets``),
    or for more explanations to render than AEX_MAX_EXPLAIN_ROWS (``all`` counts every class,
    a repeated target counts each time: each one is rendered)."""
    classes = entry["classes"]
    rendered, _ = count_rows(parse_targets(targets, classes), len(classes))
    if rendered > max_rows:
        raise BadParameterError(
            f"{rendered} explanations to render, over the limit of {max_rows} (AEX_MAX_EXPLAIN_ROWS)"
        )


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class JobService:
    """Admission, enqueueing and views of jobs on one Redis connection."""

    def __init__(self, conn: Redis, settings: Settings, catalogue: Catalogue):
        self.conn, self.settings, self.catalogue = conn, settings, catalogue
        self.queues = {k: Queue(QUEUE_NAMES[k], connection=conn, serializer=SERIALIZER) for k in JobKind}

    # --- admission ---------------------------------------------------------------------
    def check_capacity(self, kind: JobKind) -> None:
        """503 when no live worker serves the queue, 429 when the queue is at its depth."""
        queue = self.queues[kind]
        if not live_worker_keys(self.conn, queue.name):
            raise ServiceUnavailableError(f"no worker is serving the {kind.value} queue; start one with `aex worker`")
        depth = queue.count
        if depth >= self.settings.max_queue_depth:
            raise QueueFullError(
                f"the {kind.value} queue holds {depth} jobs (AEX_MAX_QUEUE_DEPTH = "
                f"{self.settings.max_queue_depth}); retry later"
            )

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
        self.check_capacity(kind)
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

    # --- shared by classify and explain --------------------------------------------------
    def _check_input(self, upload: Upload, params: CommonParams) -> str:
        """Refuse a bad upload before anything is queued; returns "dicom" or "image"."""
        if is_dicom_upload(upload):
            check_dicom(upload.data, self.settings, params.window)
            return "dicom"
        if params.window is not None:
            raise BadParameterError("window_center / window_width apply to DICOM input only")
        check_image(upload.data, self.settings)
        return "image"

    def _stability_steps(self, params: CommonParams) -> int:
        if params.stability_steps is None:
            return self.settings.stability_steps
        if params.stability_steps > self.settings.max_explain_steps:
            raise BadParameterError(
                f"stability_steps = {params.stability_steps} is over the limit of "
                f"{self.settings.max_explain_steps} (AEX_MAX_EXPLAIN_STEPS)"
            )
        return params.stability_steps

    def _job_meta(self, input_format: str, params: CommonParams) -> dict[str, Any]:
        meta: dict[str, Any] = {"input_format": input_format}
        if params.callback_url is not None:
            url = check_callback_url(params.callback_url, self.settings.callback_allowed_hosts)
            meta["callback"] = callback_meta(
                url,
                self.settings.callback_attempts,
                self.settings.callback_timeout,
                self.settings.callback_backoff_seconds,
                self.settings.result_ttl,
                self.settings.public_url,
            )
        return meta

    def _cache_key(self, kind: JobKind, entry: dict[str, Any], data: bytes, parameters: dict[str, Any]) -> str:
        checkpoint = entry.get("checkpoint_sha256") or entry.get("weights_sha256") or ""
        return result_cache_key(
            kind.value, entry["name"], checkpoint, hashlib.sha256(data).hexdigest(), parameters, __version__
        )

    def _reuse(self, kind: JobKind, model: str, key: str, kwargs: dict[str, Any], meta: dict[str, Any]) -> str | None:
        """When a finished result for ``key`` is still kept, a new job that is finished at
        once with a copy of it (``reused: true``, ``reused_from``: the job that computed it)
        and shares its images; else None."""
        if not self.settings.reuse_results:
            return None
        source_id = self.conn.get(result_index_key(key))
        if not source_id:
            return None
        try:
            source = Job.fetch(source_id.decode(), connection=self.conn, serializer=SERIALIZER)
        except NoSuchJobError:
            return None
        result = source.return_value() if source.get_status(refresh=False) == JobStatus.FINISHED else None
        ttl = self.conn.ttl(Result.get_key(source.id))
        if kind is JobKind.EXPLAIN:
            ttl = min(ttl, self.conn.ttl(images_key(source.id)))
        if not isinstance(result, dict) or ttl < MIN_REUSE_TTL_SECONDS:
            return None
        job_id = uuid.uuid4().hex
        now = datetime.now(UTC)
        job = Job.create(
            JOB_FUNCTIONS[kind],
            kwargs={"model": model, **kwargs},
            connection=self.conn,
            serializer=SERIALIZER,
            id=job_id,
            result_ttl=ttl,
            failure_ttl=ttl,
            status=JobStatus.FINISHED,
            origin=self.queues[kind].name,
            description=f"{kind.value} {model} (reused {source.id})",
            meta={
                "kind": kind.value,
                "model": model,
                **meta,
                "cache_key": key,
                "reused_from": source.id,
                "result_job": source.meta.get("result_job", source.id),
            },
        )
        job.enqueued_at = job.started_at = job.ended_at = now
        with self.conn.pipeline() as pipe:
            job.save(pipeline=pipe)
            Result.create(
                job,
                Result.Type.SUCCESSFUL,
                ttl,
                return_value={**result, "reused": True, "reused_from": source.id},
                pipeline=pipe,
            )
            job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
            self.queues[kind].finished_job_registry.add(job, ttl, pipe)
            pipe.execute()
        record_job(self.conn, kind.value, "reused", None)
        notify_job_end(self.conn, job, ApiStatus.FINISHED)
        log.info("job %s answered from the result of job %s", job_id, source.id)
        return job_id

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
        job_id = self._reuse(kind, entry["name"], key, kwargs, meta)
        if job_id is not None:
            return job_id
        if kind is JobKind.EXPLAIN:
            kwargs = {**kwargs, "result_ttl": self.settings.result_ttl}
        return self.submit(kind, upload.data, entry["name"], kwargs, {**meta, "cache_key": key}, timeout)

    # --- the two kinds of job ----------------------------------------------------------
    def classify(self, upload: Upload, params: ClassifyParams) -> JobView:
        """Check the upload, queue a classify job on the high-priority queue (or answer from
        an identical earlier one) and wait up to AEX_CLASSIFY_WAIT_SECONDS for it."""
        input_format = self._check_input(upload, params)
        entry = self.catalogue.resolve(self.conn, params.model)
        stability_steps = self._stability_steps(params) if params.stability else None
        kwargs = classify_parameters(
            params.top_k, params.stability, stability_steps or 0, params.window_center, params.window_width
        )
        meta = self._job_meta(input_format, params)
        # The stability searches take seconds, not milliseconds: the explain time limit.
        timeout = self.settings.explain_timeout if params.stability else None
        job_id = self._start(JobKind.CLASSIFY, upload, entry, kwargs, meta, timeout)
        self.wait(job_id, self.settings.classify_wait_seconds)
        return self.view(job_id)

    def explain(self, upload: Upload, params: ExplainParams) -> JobView:
        """Check the upload and the parameters, queue an explain job (or answer from an
        identical earlier one); returns at once."""
        input_format = self._check_input(upload, params)
        entry = self.catalogue.resolve(self.conn, params.model)
        if params.steps > self.settings.max_explain_steps:
            raise BadParameterError(
                f"steps = {params.steps} is over the limit of {self.settings.max_explain_steps} (AEX_MAX_EXPLAIN_STEPS)"
            )
        check_targets(params.targets, entry, self.settings.max_explain_rows)
        if params.layer is not None and "layers" in entry and params.layer not in entry["layers"]:
            raise BadParameterError(
                f"model {entry['name']!r} has no layer {params.layer!r} (the default is "
                f"{entry.get('gradcam_layer')!r}; GET /v1/models/{entry['name']} lists them)"
            )
        # The default layer by name, so that naming it or not is the same request.
        layer = params.layer or entry.get("gradcam_layer")
        kwargs = explain_parameters(
            params.targets,
            params.rho,
            params.steps,
            layer,
            self._stability_steps(params),
            params.window_center,
            params.window_width,
        )
        job_id = self._start(JobKind.EXPLAIN, upload, entry, kwargs, self._job_meta(input_format, params))
        return self.view(job_id)

    # --- reading -----------------------------------------------------------------------
    def fetch(self, job_id: str) -> Job:
        if not JOB_ID.match(job_id):
            raise UnknownJobError(f"unknown job {job_id!r}")
        try:
            return Job.fetch(job_id, connection=self.conn, serializer=SERIALIZER)
        except NoSuchJobError:
            raise UnknownJobError(f"unknown job {job_id!r} (finished jobs are kept AEX_RESULT_TTL seconds)") from None

    @staticmethod
    def _kind(job: Job) -> JobKind | None:
        """The job's kind (None for an rq job that is not one of ours)."""
        value = job.meta.get("kind")
        return JobKind(value) if value in {k.value for k in JobKind} else None

    def _lease_expired(self, job: Job, kind: JobKind) -> bool:
        return job.id in self.queues[kind].started_job_registry.get_expired_job_ids()

    def view(self, job_id: str) -> JobView:
        job = self.fetch(job_id)
        kind = self._kind(job)
        status = job.get_status(refresh=False)
        if status == JobStatus.STARTED and kind is not None and self._lease_expired(job, kind):
            # Its worker died: fail it now rather than at the next worker maintenance.
            reap_abandoned(self.conn)
            job = self.fetch(job_id)
            status = job.get_status(refresh=False)
        api_status = STATUS_FROM_RQ.get(status, ApiStatus.QUEUED)
        url = f"/v1/jobs/{job.id}"

        position = None
        if api_status is ApiStatus.QUEUED and kind is not None:
            position = self.queues[kind].get_job_position(job.id)
        progress = Progress(**job.meta["progress"]) if isinstance(job.meta.get("progress"), dict) else None

        enq, start, end = _utc(job.enqueued_at), _utc(job.started_at), _utc(job.ended_at)
        if api_status is ApiStatus.QUEUED:
            start = end = None
        now = datetime.now(UTC)
        timings = Timings(
            enqueued_at=enq,
            started_at=start,
            ended_at=end,
            queued_seconds=((start or now) - enq).total_seconds() if enq else None,
            run_seconds=((end or now) - start).total_seconds() if start else None,
        )

        result = images = dicom = error = None
        if api_status is ApiStatus.FINISHED:
            result = job.return_value()
            if isinstance(result, dict) and kind is JobKind.EXPLAIN:
                images = {}
                for name in (result.get("files") or {}).values():
                    images[name] = f"{url}/images/{name}"
                for target in result.get("targets", []):
                    for key in ("image", "difference"):
                        if target.get(key):
                            images[target[key]] = target[f"{key}_url"] = f"{url}/images/{target[key]}"
                if result.get("dicom_files"):
                    dicom = {name: f"{url}/dicom/{name}" for name in result["dicom_files"]}
                    for target in result.get("targets", []):
                        for key in ("dicom", "dicom_difference"):
                            if target.get(key):
                                target[f"{key}_url"] = f"{url}/dicom/{target[key]}"
        elif api_status is ApiStatus.FAILED:
            error = (
                ErrorBody(**job.meta["error"])
                if isinstance(job.meta.get("error"), dict)
                else ErrorBody(code="job_failed", message=(job.exc_info or "the job failed").strip().splitlines()[-1])
            )
        elif api_status is ApiStatus.CANCELLED:
            error = ErrorBody(code="job_cancelled", message="the job was cancelled")

        return JobView(
            id=job.id,
            url=url,
            kind=kind,
            status=api_status,
            model=job.meta.get("model"),
            queue_position=position,
            progress=progress,
            timings=timings,
            result=result,
            images=images,
            dicom=dicom,
            callback=delivery_record(self.conn, job),
            error=error,
        )

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
