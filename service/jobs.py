"""The API's side of the queue: served models, admission, enqueueing, job views, cancelling.

Blocking Redis calls: the routes run these methods in the thread pool.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from redis import Redis
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result

from aex.errors import (
    BadParameterError,
    CheckpointError,
    QueueFullError,
    ServiceUnavailableError,
    UnknownJobError,
    UnknownModelError,
)
from aex.settings import Settings
from models.catalogue import catalogue_entry, discover_checkpoints, read_checkpoint_metadata
from worker.protocol import (
    JOB_FUNCTIONS,
    QUEUE_NAMES,
    SERIALIZER,
    STATUS_FROM_RQ,
    TARGET_WORDS,
    ApiStatus,
    JobKind,
    cancel_key,
    images_key,
    live_worker_keys,
    published_catalogue,
    reap_abandoned,
    upload_key,
)

from .schemas import ClassifyParams, ErrorBody, ExplainParams, JobView, Progress, Timings
from .uploads import check_image

log = logging.getLogger("aex.service")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\.png$")


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
            raise ServiceUnavailableError("no models are served (no worker has published any and no checkpoint "
                                          "was found)")
        name = name or self.settings.default_model or sorted(models)[0]
        if name not in models:
            raise UnknownModelError(f"unknown model {name!r}; served: {', '.join(sorted(models))}")
        return models[name]


def check_targets(targets: list[str], entry: dict[str, Any], max_rows: int) -> None:
    """400 for a target the workers would refuse, or too many distinct ones."""
    classes = entry["classes"]
    rows: set[int | str] = set()
    for spec in targets:
        key = spec.strip()
        if key.lower() in ("predicted", "runner-up"):
            rows.add(key.lower())
        elif key.lower() == "all":
            rows.update(range(len(classes)))
        elif key in classes:
            rows.add(classes.index(key))
        elif key.isdigit() and int(key) < len(classes):
            rows.add(int(key))
        else:
            raise BadParameterError(f"unknown target {spec!r}: use {', '.join(TARGET_WORDS)}, a class index below "
                                    f"{len(classes)} or one of {', '.join(classes[:20])}"
                                    + (", ..." if len(classes) > 20 else ""))
    if not rows:
        raise BadParameterError("no targets to explain")
    if len(rows) > max_rows:
        raise BadParameterError(f"{len(rows)} targets to explain, over the limit of {max_rows} (AEX_MAX_EXPLAIN_ROWS)")


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


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
            raise QueueFullError(f"the {kind.value} queue holds {depth} jobs (AEX_MAX_QUEUE_DEPTH = "
                                 f"{self.settings.max_queue_depth}); retry later")

    def submit(self, kind: JobKind, image: bytes, model: str, kwargs: dict[str, Any]) -> str:
        """Store the upload (with its TTL) and enqueue the job by dotted path. Returns its id."""
        self.check_capacity(kind)
        job_id = uuid.uuid4().hex
        timeout = self.settings.classify_timeout if kind is JobKind.CLASSIFY else self.settings.explain_timeout
        self.conn.set(upload_key(job_id), image, ex=self.settings.upload_ttl)
        self.queues[kind].enqueue(
            JOB_FUNCTIONS[kind], kwargs={"model": model, **kwargs}, job_id=job_id, job_timeout=timeout,
            result_ttl=self.settings.result_ttl, failure_ttl=self.settings.result_ttl, ttl=self.settings.upload_ttl,
            meta={"kind": kind.value, "model": model}, description=f"{kind.value} {model}",
        )
        return job_id

    def wait(self, job_id: str, seconds: float) -> None:
        """Block until the job has a result (success, failure or stop), at most ``seconds``."""
        if seconds > 0:
            self.conn.xread({Result.get_key(job_id): "0-0"}, block=max(1, int(seconds * 1000)))

    def classify(self, image: bytes, params: ClassifyParams) -> JobView:
        """Check the image, queue a classify job on the high-priority queue and wait up to
        AEX_CLASSIFY_WAIT_SECONDS for it."""
        check_image(image, self.settings)
        entry = self.catalogue.resolve(self.conn, params.model)
        job_id = self.submit(JobKind.CLASSIFY, image, entry["name"], {"top_k": params.top_k})
        self.wait(job_id, self.settings.classify_wait_seconds)
        return self.view(job_id)

    def explain(self, image: bytes, params: ExplainParams) -> JobView:
        """Check the image and the parameters, queue an explain job; returns at once."""
        check_image(image, self.settings)
        entry = self.catalogue.resolve(self.conn, params.model)
        if params.steps > self.settings.max_explain_steps:
            raise BadParameterError(f"steps = {params.steps} is over the limit of {self.settings.max_explain_steps} "
                                    f"(AEX_MAX_EXPLAIN_STEPS)")
        check_targets(params.targets, entry, self.settings.max_explain_rows)
        if params.layer is not None and "layers" in entry and params.layer not in entry["layers"]:
            raise BadParameterError(f"model {entry['name']!r} has no layer {params.layer!r} (the default is "
                                    f"{entry.get('gradcam_layer')!r}; GET /v1/models/{entry['name']} lists them)")
        job_id = self.submit(JobKind.EXPLAIN, image, entry["name"], {
            "targets": params.targets, "rho": params.rho, "steps": params.steps, "layer": params.layer,
            "result_ttl": self.settings.result_ttl})
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
        now = datetime.now(timezone.utc)
        timings = Timings(
            enqueued_at=enq, started_at=start, ended_at=end,
            queued_seconds=((start or now) - enq).total_seconds() if enq else None,
            run_seconds=((end or now) - start).total_seconds() if start else None,
        )

        result = images = error = None
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
        elif api_status is ApiStatus.FAILED:
            error = ErrorBody(**job.meta["error"]) if isinstance(job.meta.get("error"), dict) else ErrorBody(
                code="job_failed", message=(job.exc_info or "the job failed").strip().splitlines()[-1])
        elif api_status is ApiStatus.CANCELLED:
            error = ErrorBody(code="job_cancelled", message="the job was cancelled")

        return JobView(id=job.id, url=url, kind=kind, status=api_status, model=job.meta.get("model"),
                       queue_position=position, progress=progress, timings=timings, result=result, images=images,
                       error=error)

    def image(self, job_id: str, name: str) -> bytes:
        self.fetch(job_id)
        if not IMAGE_NAME.match(name):
            raise UnknownJobError(f"job {job_id} has no image {name!r}")
        data = self.conn.hget(images_key(job_id), name)
        if data is None:
            raise UnknownJobError(f"job {job_id} has no image {name!r} (not finished, not an explain job, or "
                                  f"expired)")
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
            try:
                send_stop_job_command(self.conn, job_id, serializer=SERIALIZER)
            except InvalidJobOperation:
                pass  # it stopped running meanwhile; the flag (or its end) settles it
        else:
            try:
                job.cancel()
                self.conn.delete(upload_key(job_id))
            except InvalidJobOperation:
                pass  # cancelled by another request meanwhile
        return self.view(job_id)

