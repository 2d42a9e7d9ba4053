"""The one job service behind the routes: admission (``service.admission``), result reuse
(``service.reuse``), enqueueing, job views (``service.views``), outputs and cancelling, each
for the principal that asks.

A job belongs to its submitter (``job.meta["owner"]``); another principal gets the same 404
for it as for a job that does not exist (``fetch_for``), ``admin`` sees every job. Each
principal has at most AEX_MAX_JOBS_PER_PRINCIPAL jobs queued or running (``service.quota``).
Uploads are stored, and outputs read, sealed with AEX_DATA_KEY (``jobs.crypto``).
Blocking Redis calls: the routes run these methods in the thread pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from redis import Redis

from jobs import rqueue
from jobs.callbacks import CallbackPolicy, notify_job_end
from jobs.crypto import DataCipher, blob_context
from jobs.epoch import epoch_of, lost_in_restart, new_job_id
from jobs.failures import reap_abandoned
from jobs.keys import api_keys_revision_key, cancel_key, dicom_key, images_key, store_epoch_key, upload_key
from jobs.params import classify_parameters, explain_parameters, result_cache_key
from jobs.queues import QUEUE_NAMES, JobKind, lane_of
from jobs.rqueue import JobRecord
from jobs.settings import Settings
from jobs.states import TERMINAL, ApiStatus
from models.errors import (
    JobLostError,
    UnknownJobError,
)
from models.version import __version__
from service import admission, quota
from service.audit_answer import AnswerAhead
from service.auth.guard import Acting
from service.auth.principal import Principal, can_access, owner_meta, owner_of_meta, reuse_scope
from service.catalogue import Catalogue
from service.multipart import Upload
from service.reuse import fetch_reused, reuse_index_key, reuse_result
from service.schemas import ClassifyParams, ExplainParams
from service.timing import stage
from service.views import ShownJob, job_view

log = logging.getLogger("aex.service")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\.png$")
DICOM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\.dcm$")


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def unknown_job(job_id: str) -> str:
    """The one message of a job that is not there, or not the asker's."""
    return f"unknown job {job_id!r} (finished jobs are kept AEX_RESULT_TTL seconds)"


class JobService:
    """Admission, enqueueing and views of jobs on one Redis connection. ``cipher`` seals
    uploads and opens outputs; ``policy`` is how callbacks sent from the API are sent."""

    def __init__(
        self,
        conn: Redis,
        settings: Settings,
        catalogue: Catalogue,
        cipher: DataCipher,
        policy: CallbackPolicy | None = None,
    ):
        self.conn, self.settings, self.catalogue = conn, settings, catalogue
        self.cipher, self.policy = cipher, policy
        # The store's epoch as the last lookup read it: a new job written under it (``_start``).
        self.epoch: str | None = None

    def submit(
        self,
        kind: JobKind,
        image: bytes,
        model: str,
        kwargs: dict[str, Any],
        meta: dict[str, Any] | None = None,
        timeout: int | None = None,
        lane: JobKind | None = None,
        principal: Principal | None = None,
        *,
        depth: int | None = None,
        epoch: bytes | str | None = None,
        lead: list[list[str]] | None = None,
        conditions: list[rqueue.Condition] | None = None,
    ) -> str:
        """Count the job against ``principal``'s share (429 ``too_many_jobs`` beyond
        AEX_MAX_JOBS_PER_PRINCIPAL), store the upload sealed (with its TTL) and enqueue the job
        by dotted path on the queue of ``lane`` (default: its kind's): the share, the upload
        and the job in one step, written together or not at all. ``depth`` and ``epoch``: the
        queue's length and the store's epoch as ``_start`` read them (read here when None);
        ``lead``: commands written first in the same step (the request's pending audit record);
        ``conditions``: what the step is written under, the queue's depth among them
        (``rqueue.Moved``, nothing written, when one does not hold). Returns its id."""
        lane = lane or kind
        with stage("capacity"):
            served = self.catalogue.served(self.conn, QUEUE_NAMES[lane])
            if conditions is None:
                admission.check_capacity(self.conn, lane, self.settings, depth=depth, served=served)
            else:
                admission.check_served(self.conn, lane, served)
            job_id = new_job_id(self.conn, epoch)
        if timeout is None:
            timeout = self.settings.classify_timeout if lane is JobKind.CLASSIFY else self.settings.explain_timeout
        share = None
        if principal is not None:
            # The longest a job can wait and run (every retry included): the share's set lives that long.
            ttl = self.settings.upload_ttl + timeout * (self.settings.job_retries + 1)
            share = quota.share_of(principal, self.settings.max_jobs_per_principal, ttl)
        upload = []
        if not (meta or {}).get("pacs_reference"):  # by reference, the worker fetches it
            with stage("seal"):
                sealed = self.cipher.seal(image, blob_context(upload_key(job_id)))
                upload.append(["SET", upload_key(job_id), sealed, "EX", self.settings.upload_ttl])
        with stage("enqueue"):
            queued = rqueue.enqueue(
                self.conn,
                lane,
                kind,
                job_id,
                kwargs={"model": model, **kwargs},
                meta={"kind": kind.value, "model": model, **(meta or {})},
                timeout=timeout,
                result_ttl=self.settings.result_ttl,
                wait_ttl=self.settings.upload_ttl,
                description=f"{kind.value} {model}",
                share=share,
                also=upload,
                lead=lead,
                conditions=conditions,
            )
        if not queued:
            raise quota.too_many(self.settings.max_jobs_per_principal)
        return job_id

    def wait(self, job_id: str, seconds: float, ahead: AnswerAhead | None = None) -> JobRecord | None:
        """Block until the job has a result (success, failure or stop), at most ``seconds``;
        then its record, read in the same round trip (None when Redis has no such job).
        ``ahead``: the request's final audit record, written in that round trip when the job
        has finished (``service.audit_answer.AnswerAhead``)."""
        fill = ahead.writes(job_id, rqueue.CLOCK_STAND_IN) if ahead is not None else None
        with stage("wait"):
            record, written = rqueue.wait_for_end(self.conn, job_id, seconds, fill)
        if ahead is not None:
            ahead.written(written)
        return record

    def _cache_key(self, kind: JobKind, entry: dict[str, Any], digest: str, parameters: dict[str, Any]) -> str:
        checkpoint = entry.get("checkpoint_sha256") or entry.get("weights_sha256") or ""
        return result_cache_key(kind.value, entry["name"], checkpoint, digest, parameters, __version__)

    def _start(
        self,
        principal: Principal,
        kind: JobKind,
        upload: Upload,
        entry: dict[str, Any],
        kwargs: dict[str, Any],
        meta: dict[str, Any],
        lane: JobKind,
        acting: Acting | None = None,
    ) -> tuple[str, bool, Principal]:
        """The id of a job of ``principal`` answering the request, whether it is a reused
        result (of the same principal or tenant, finished already) rather than a newly queued
        job on the queue of ``lane``, and the principal (looked up again when the API keys
        changed since its cached lookup). ``acting``: what the request owes before it acts
        (``service.auth.Acting``): its cached principal confirmed with the first reads, its
        pending audit record written first with its job."""
        scope = reuse_scope(principal)
        # An input by reference is named by its PACS and UIDs (a SOP Instance UID names one
        # object for good): the key of its result, until the worker has its bytes.
        ref = meta.get("pacs_reference")
        digest = upload.sha256 if ref is None else hashlib.sha256(json.dumps(ref, sort_keys=True).encode()).hexdigest()
        owned = {**meta, "owner": owner_meta(principal), "input_sha256": digest, "reuse_scope": scope}
        key = self._cache_key(kind, entry, digest, {**kwargs, "store": meta.get("store")} if ref else kwargs)
        confirm = acting is not None and acting.revision is not None
        first = [acting.pending] if acting is not None and acting.pending else []
        job_kwargs = {**kwargs, "result_ttl": self.settings.result_ttl} if kind is JobKind.EXPLAIN else kwargs

        def queue(**how: Any) -> str:
            job_meta = {**owned, "cache_key": key}
            return self.submit(
                kind, upload.data, entry["name"], job_kwargs, job_meta, None, lane, principal, lead=first, **how
            )

        # The common case in one round trip: the job written under what the lookup below would
        # read (no earlier result, the queue below its depth, the store's epoch as last read,
        # the API keys as the cached principal was looked up), all checked where it is written;
        # when any of them moved, nothing is written and the lookup decides.
        if self.epoch is not None:
            conditions = [
                rqueue.absent(reuse_index_key(scope, key)),
                rqueue.shorter_than(rqueue.queue_key(lane), self.settings.max_queue_depth),
                rqueue.holding(store_epoch_key(), self.epoch),
            ]
            if confirm:
                conditions.append(rqueue.holding(api_keys_revision_key(), acting.revision))
            try:
                job_id = queue(epoch=self.epoch, conditions=conditions)
            except rqueue.Moved:
                pass
            else:
                if confirm:
                    acting.confirmed(acting.revision)
                return job_id, False, principal
        # What the request needs to know before it acts, in one round trip: an earlier result,
        # the queue's length, the store's epoch (the new job id carries it), and whether the
        # API keys are as its cached principal was looked up.
        with stage("lookup"), self.conn.pipeline(transaction=False) as pipe:
            pipe.get(reuse_index_key(scope, key))
            pipe.llen(rqueue.queue_key(lane))
            pipe.get(store_epoch_key())
            if confirm:
                pipe.get(api_keys_revision_key())
            source_id, depth, epoch, *revision = pipe.execute()
        if confirm:
            again = acting.confirmed(_text(revision[0]))
            if again is not None:  # the keys changed: looked up again (a revoked key is refused there)
                return self._start(again, kind, upload, entry, kwargs, meta, lane, acting)
        with stage("lookup"):
            job_id = reuse_result(
                self.conn, self.settings, kind, entry["name"], key, owned, scope, self.policy, source_id, first
            )
        if job_id is not None:
            return job_id, True, principal
        job_id = queue(depth=depth, epoch=epoch)
        self.epoch = epoch_of(job_id)  # as read, or set by new_job_id where Redis had none
        return job_id, False, principal

    # --- the two kinds of job ----------------------------------------------------------
    def classify(
        self,
        principal: Principal,
        upload: Upload,
        params: ClassifyParams,
        acting: Acting | None = None,
        ahead: AnswerAhead | None = None,
    ) -> ShownJob:
        """Check the upload, queue a classify job (or answer from an identical earlier one)
        and wait up to AEX_CLASSIFY_WAIT_SECONDS for it. A plain classify goes to the
        high-priority classify queue; one with the stability score (seconds of searches, the
        explain time limit) waits on the explain queue, behind every plain classify.
        ``acting``: what the request owes before it acts (``_start``); ``ahead``: its final
        audit record, written with the wait when the job finished (``wait``)."""
        with stage("admission"):
            entry = self.catalogue.resolve(self.conn, params.model)
            input_format = admission.check_input(upload, params, self.settings, entry)
            stability_steps = admission.stability_steps(params, self.settings) if params.stability else None
            kwargs = classify_parameters(
                params.top_k,
                params.stability,
                stability_steps or 0,
                params.window_center,
                params.window_width,
                stability_mode=admission.stability_mode(params, self.settings),
            )
            meta = admission.job_meta(input_format, params, self.settings)
        lane = lane_of(JobKind.CLASSIFY, params.stability)
        job_id, reused, principal = self._start(principal, JobKind.CLASSIFY, upload, entry, kwargs, meta, lane, acting)
        waited = None if reused else self.wait(job_id, self.settings.classify_wait_seconds, ahead)
        with stage("view"):
            return self.view(principal, job_id, waited)

    def explain(
        self, principal: Principal, upload: Upload, params: ExplainParams, acting: Acting | None = None
    ) -> ShownJob:
        """Check the upload and the parameters, queue an explain job (or answer from an
        identical earlier one); returns at once. ``acting``: what the request owes before it
        acts (``_start``)."""
        with stage("admission"):
            entry = self.catalogue.resolve(self.conn, params.model)
            input_format = admission.check_input(upload, params, self.settings, entry)
            layer = admission.check_explain(params, entry, self.settings)
        kwargs = explain_parameters(
            params.targets,
            params.rho,
            params.steps,
            layer,
            admission.stability_steps(params, self.settings),
            params.window_center,
            params.window_width,
            stability_mode=admission.stability_mode(params, self.settings),
        )
        job_id, _, principal = self._start(
            principal,
            JobKind.EXPLAIN,
            upload,
            entry,
            kwargs,
            admission.job_meta(input_format, params, self.settings),
            lane_of(JobKind.EXPLAIN),
            acting,
        )
        return self.view(principal, job_id)

    # --- reading -----------------------------------------------------------------------
    def fetch(self, job_id: str, fetched: JobRecord | None = None) -> JobRecord:
        """The job ``job_id``, whoever owns it (internal: the routes use ``fetch_for``): a
        queued one, or one answered from an earlier result (``service.reuse``); ``fetched``:
        its record if read already (``wait``)."""
        if not JOB_ID.match(job_id):
            raise UnknownJobError(f"unknown job {job_id!r}")
        job = fetched or rqueue.fetch_job(self.conn, job_id) or fetch_reused(self.conn, job_id)
        if job is not None:
            return job
        if lost_in_restart(self.conn, job_id):
            raise JobLostError(
                f"job {job_id} is gone: the job store (Redis) lost its data after the job was accepted "
                "(restarted without persistence, or emptied); submit it again"
            )
        raise UnknownJobError(unknown_job(job_id))

    def fetch_for(self, principal: Principal, job_id: str, fetched: JobRecord | None = None) -> JobRecord:
        """The job ``job_id`` if ``principal`` may see it (its own; every job for ``admin``).
        Another principal's job is answered exactly as a job that does not exist: nothing
        tells one from the other."""
        job = self.fetch(job_id, fetched)
        if not can_access(principal, owner_of_meta(job.meta)):
            raise UnknownJobError(unknown_job(job_id))
        return job

    def view(self, principal: Principal, job_id: str, fetched: JobRecord | None = None) -> ShownJob:
        job = self.fetch_for(principal, job_id, fetched)
        if job.kind is not None and rqueue.lease_expired(self.conn, job):
            # Its worker died: fail it now rather than at the next worker maintenance.
            reap_abandoned(self.conn, self.settings.job_retries, self.policy)
            job = self.fetch(job_id)
        position = None
        if job.kind is not None and job.status is ApiStatus.QUEUED:
            position = rqueue.queue_position(self.conn, job)
        return job_view(self.conn, job, position)

    @staticmethod
    def _result_job(job: JobRecord) -> str:
        """The job whose stored images a job shows (itself, or the one it reused)."""
        return str(job.meta.get("result_job") or job.id)

    def _output(self, redis_key: str, name: str) -> bytes | None:
        """The output ``name`` of the hash ``redis_key``, opened (None when absent)."""
        data = self.conn.hget(redis_key, name)
        return None if data is None else self.cipher.open(data, blob_context(redis_key, name))

    def image(self, principal: Principal, job_id: str, name: str) -> bytes:
        job = self.fetch_for(principal, job_id)
        if not IMAGE_NAME.match(name):
            raise UnknownJobError(f"job {job_id} has no image {name!r}")
        data = self._output(images_key(self._result_job(job)), name)
        if data is None:
            raise UnknownJobError(f"job {job_id} has no image {name!r} (not finished, not an explain job, or expired)")
        return data

    def dicom(self, principal: Principal, job_id: str, name: str) -> bytes:
        """One DICOM Secondary Capture object of a finished explain job on DICOM input."""
        job = self.fetch_for(principal, job_id)
        if not DICOM_NAME.match(name):
            raise UnknownJobError(f"job {job_id} has no DICOM object {name!r}")
        data = self._output(dicom_key(self._result_job(job)), name)
        if data is None:
            raise UnknownJobError(
                f"job {job_id} has no DICOM object {name!r} (not finished, not an explain job "
                f"on DICOM input, or expired)"
            )
        return data

    # --- cancelling --------------------------------------------------------------------
    def cancel(self, principal: Principal, job_id: str) -> ShownJob:
        """Cancel a queued job at once; ask a running one to stop at its next step (it then
        shows "cancelled"). A job already over is left as it is.

        Race-free against the workers: the flag is set first (a worker checks it before the
        first step), then the job's id is removed from its queue. Only when that removal
        took it out (LREM is atomic with a worker's dequeue) is the job cancelled here; else
        a worker has it, and the flag and the stop command end it as "cancelled" (or it ends
        before it looks, as it would have anyway)."""
        job = self.fetch_for(principal, job_id)
        if job.status in TERMINAL:
            return self.view(principal, job_id)
        self.conn.set(cancel_key(job_id), 1, ex=self.settings.result_ttl)
        if rqueue.cancel_queued(self.conn, job):
            self.conn.delete(upload_key(job_id))
            # No worker will see this job end: tell its callback here.
            notify_job_end(self.conn, job, ApiStatus.CANCELLED, policy=self.policy)
        else:
            # A worker has it (or is taking it, or it has just ended), or another request
            # cancelled it meanwhile: stop it if it runs.
            rqueue.stop_running(self.conn, job_id)
        return self.view(principal, job_id)
