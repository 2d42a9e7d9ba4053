"""``aex watch``'s engine: follow a PACS's new studies and submit each matching instance once to the aex service.

Two feeds find new studies: Orthanc's change feed (``GET /changes?since=N``, its
``StableStudy`` events) when the PACS is an Orthanc (its REST root is ``orthanc_rest`` in
AEX_PACS, or found beside the DICOMweb root), else a QIDO-RS poll of studies by StudyDate
(from the day the watcher first started, one day back each poll). A study's instances are
listed by QIDO-RS and kept when their modality matches, their SOP class is an image (not an
SR, Parametric Map, Segmentation, presentation state, ...) and their series is not aex's own
(Manufacturer "aex", or "not for diagnostic use" in its description): results stored back
into a study never come back as inputs.

State lives in Redis (``jobs.keys.watch_key``, per PACS and model): the feed's cursor,
saved after each study, so a watcher resumes where it stopped; one key per submitted
instance (its job id), claimed before the submission, so no instance is submitted twice;
and a lock, so one watcher at a time follows a PACS for a model. A claim a watcher left
behind when killed mid-submission is taken over by the next one (that instance may then be
submitted twice: the service answers an identical request from its kept result). A
submission the service turns away for now (429, unreachable) releases its claim and is
tried again at the next pass; one it refuses for good (a bad file) is remembered as failed.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from jobs.keys import watch_key
from models.errors import (
    AexError,
    BadParameterError,
    PacsError,
    QueueFullError,
    ServiceUnavailableError,
    StoreUnavailableError,
)
from pacs.read import PacsReference, endpoint, search_instances, search_studies, session_for, timeouts, with_retries
from pacs.store import store_results

log = logging.getLogger("aex.watch")

# SOP Class UID prefixes of objects that are not images to explain.
NOT_IMAGES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.30",  # parametric map
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, segmentation, registration
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.481.",  # radiotherapy
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
)
AEX_MANUFACTURER = "aex"
# How long a submitted instance is remembered (the feed never goes back further in practice).
MEMORY_SECONDS = 90 * 86400
LOCK_SECONDS = 60
CHANGES_PAGE = 100
QIDO_LOOKBACK_DAYS = 1
# Codes of submissions worth trying again later; any other refusal is final for that instance.
RETRY_LATER = {
    QueueFullError.code,
    ServiceUnavailableError.code,
    StoreUnavailableError.code,
    "too_many_jobs",
    "pacs_unreachable",
    "http_error",
}
# Codes that say the watcher itself is misconfigured (its token, its model): it stops.
FATAL = {"unauthenticated", "key_lost", "forbidden", "unknown_model", "unknown_pacs"}

Submit = Callable[[PacsReference], str]


def wanted(row: dict[str, Any], modalities: frozenset[str]) -> bool:
    """Whether an instance (a ``pacs.read.search_instances`` row) is one to explain."""
    sop_class = row.get("sop_class_uid") or ""
    if any(sop_class.startswith(prefix) for prefix in NOT_IMAGES):
        return False
    if (row.get("manufacturer") or "").strip().lower() == AEX_MANUFACTURER:
        return False
    if "not for diagnostic use" in (row.get("series_description") or "").lower():
        return False
    return not modalities or (row.get("modality") or "").upper() in modalities


def orthanc_root(settings, pacs: str) -> str | None:
    """Orthanc's REST root for ``pacs``: ``orthanc_rest`` when configured, else the DICOMweb
    root's parent when ``GET <it>/system`` answers as Orthanc does; None otherwise."""
    import requests

    ep = endpoint(settings.pacs, pacs)
    if ep.orthanc_rest:
        return ep.orthanc_rest
    if not ep.url or "/" not in ep.url.split("://", 1)[1]:
        return None
    candidate = ep.url.rsplit("/", 1)[0]
    try:
        with session_for(ep) as session:
            resp = session.get(f"{candidate}/system", timeout=timeouts(ep))
        body = resp.json() if resp.status_code == 200 else {}
    except (requests.RequestException, ValueError):
        return None
    return candidate if isinstance(body, dict) and "DicomAet" in body and "Version" in body else None


class WatchState:
    """The watcher's state in Redis (module docstring)."""

    def __init__(self, conn, pacs: str, model: str | None):
        self.conn, self.run_id = conn, uuid.uuid4().hex
        self.key = lambda part: watch_key(pacs, model or "default", part)

    def lock(self) -> bool:
        """Take (or renew) the lock of this PACS and model; False when another watcher holds it."""
        if self.conn.set(self.key("lock"), self.run_id, nx=True, ex=LOCK_SECONDS):
            return True
        if (self.conn.get(self.key("lock")) or b"").decode() == self.run_id:
            self.conn.expire(self.key("lock"), LOCK_SECONDS)
            return True
        return False

    def unlock(self) -> None:
        if (self.conn.get(self.key("lock")) or b"").decode() == self.run_id:
            self.conn.delete(self.key("lock"))

    def cursor(self) -> str | None:
        value = self.conn.get(self.key("cursor"))
        return value.decode() if value is not None else None

    def set_cursor(self, value: str) -> None:
        self.conn.set(self.key("cursor"), value)

    def claim(self, instance_uid: str) -> bool:
        """True when this watcher may submit the instance (nobody did, or a dead watcher's claim)."""
        key = self.key(f"instance:{instance_uid}")
        if self.conn.set(key, f"pending:{self.run_id}", nx=True, ex=MEMORY_SECONDS):
            return True
        held = (self.conn.get(key) or b"").decode()
        return held.startswith("pending:") and held != f"pending:{self.run_id}" and self._take_over(key, held)

    def _take_over(self, key: str, held: str) -> bool:
        with self.conn.pipeline() as pipe:
            try:
                pipe.watch(key)
                if (pipe.get(key) or b"").decode() != held:
                    return False
                pipe.multi()
                pipe.set(key, f"pending:{self.run_id}", ex=MEMORY_SECONDS)
                pipe.execute()
                return True
            except Exception:
                return False

    def record(self, instance_uid: str, outcome: str) -> None:
        self.conn.set(self.key(f"instance:{instance_uid}"), outcome, ex=MEMORY_SECONDS)

    def release(self, instance_uid: str) -> None:
        self.conn.delete(self.key(f"instance:{instance_uid}"))

    def outcome(self, instance_uid: str) -> str | None:
        value = self.conn.get(self.key(f"instance:{instance_uid}"))
        return value.decode() if value is not None else None

    def track_job(self, job_id: str, ref: PacsReference) -> None:
        self.conn.hset(self.key("jobs"), job_id, json.dumps(ref.as_dict()))

    def tracked_jobs(self) -> dict[str, PacsReference]:
        raw = self.conn.hgetall(self.key("jobs"))
        return {k.decode(): PacsReference(**json.loads(v)) for k, v in raw.items()}

    def untrack_job(self, job_id: str) -> None:
        self.conn.hdel(self.key("jobs"), job_id)


class Watcher:
    """Follows one PACS and submits its new instances through ``submit`` (ref -> job id).
    ``collect(job_id)`` (upload mode) returns the finished job's DICOM objects (None while it
    runs), which the watcher stores back to the PACS itself; None: the service stores them."""

    def __init__(
        self,
        settings,
        pacs: str,
        state: WatchState,
        submit: Submit,
        modalities: frozenset[str] = frozenset(),
        interval: float = 5.0,
        feed: str = "auto",
        collect: Callable[[str], list[bytes] | None] | None = None,
        stop: threading.Event | None = None,
        today: Callable[[], date] = date.today,
    ):
        endpoint(settings.pacs, pacs)  # unknown_pacs before anything else
        self.settings, self.pacs, self.state, self.submit = settings, pacs, state, submit
        self.modalities = frozenset(m.upper() for m in modalities)
        self.interval, self.collect, self.today = interval, collect, today
        self.stop = stop or threading.Event()
        self.rest = orthanc_root(settings, pacs) if feed in ("auto", "orthanc") else None
        if feed == "orthanc" and self.rest is None:
            raise BadParameterError(f"PACS {pacs!r} does not answer as an Orthanc: set orthanc_rest in AEX_PACS")
        self.feed = "orthanc" if self.rest else "qido"
        self.submitted: list[str] = []  # job ids of this run
        self._study_counts: dict[str, Any] = {}

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> None:
        """Follow the PACS until ``stop`` is set (Ctrl-C); the lock is released at the end."""
        if not self.state.lock():
            raise BadParameterError(f"another aex watch follows PACS {self.pacs!r} for this model")
        log.info("watching PACS %r (%s feed)", self.pacs, self.feed)
        try:
            while not self.stop.is_set():
                if not self.state.lock():
                    raise BadParameterError(f"another aex watch took over PACS {self.pacs!r} for this model")
                more = False
                try:
                    more = self.step()
                except (PacsError, ServiceUnavailableError) as exc:
                    log.warning("%s; trying again in %.0f s", exc.message, self.interval)
                if not more:
                    self.stop.wait(self.interval)
        finally:
            self.state.unlock()

    def step(self) -> bool:
        """One pass: stored-back results of finished jobs, then new studies. True when the
        feed has more to read at once."""
        if self.collect is not None:
            self.store_finished()
        return self.follow_orthanc() if self.feed == "orthanc" else self.poll_qido()

    # --- feeds --------------------------------------------------------------------------
    def _orthanc_get(self, path: str) -> Any:
        ep = endpoint(self.settings.pacs, self.pacs)

        def get():
            with session_for(ep) as session:
                resp = session.get(f"{self.rest}{path}", timeout=timeouts(ep))
                resp.raise_for_status()
                return resp.json()

        return with_retries(self.pacs, f"read Orthanc's {path.split('?')[0]}", get)

    def follow_orthanc(self) -> bool:
        cursor = self.state.cursor()
        if cursor is None:  # first start: from now on
            cursor = str(int(self._orthanc_get("/changes?last")["Last"]))
            self.state.set_cursor(cursor)
        page = self._orthanc_get(f"/changes?since={int(cursor)}&limit={CHANGES_PAGE}")
        for change in page.get("Changes", []):
            if self.stop.is_set():
                return False
            if change.get("ChangeType") == "StableStudy":
                study = self._orthanc_get(f"/studies/{change['ID']}")
                uid = (study.get("MainDicomTags") or {}).get("StudyInstanceUID")
                if uid and not self.submit_study(uid):
                    return False  # turned away for now: the cursor stays before this study
            self.state.set_cursor(str(int(change["Seq"])))
        return not page.get("Done", True)

    def poll_qido(self) -> bool:
        cursor = self.state.cursor()
        today = self.today()
        start = date.fromisoformat(cursor) if cursor else today
        since = min(start, today - timedelta(days=QIDO_LOOKBACK_DAYS))
        for study in search_studies(self.settings.pacs, self.pacs, study_date=f"{since:%Y%m%d}-"):
            if self.stop.is_set():
                return False
            seen = self._study_counts.get(study["study_uid"])
            if seen is not None and seen == study["instances"]:
                continue  # nothing new in it since the last poll
            if not self.submit_study(study["study_uid"]):
                return False
            self._study_counts[study["study_uid"]] = study["instances"]
        self.state.set_cursor(today.isoformat())
        return False

    # --- submissions --------------------------------------------------------------------
    def submit_study(self, study_uid: str) -> bool:
        """Submit every wanted instance of a study not submitted yet; False when the service
        turned one away for now (the study is visited again later)."""
        for row in search_instances(self.settings.pacs, self.pacs, study_uid):
            if self.stop.is_set():
                return False
            if not wanted(row, self.modalities) or not self.state.claim(row["instance_uid"]):
                continue
            ref = PacsReference(self.pacs, row["study_uid"], row["series_uid"], row["instance_uid"])
            try:
                job_id = self.submit(ref)
            except AexError as exc:
                if exc.code in FATAL:
                    self.state.release(ref.instance_uid)
                    raise
                if exc.code in RETRY_LATER:
                    self.state.release(ref.instance_uid)
                    log.warning("%s: %s (trying again later)", ref.describe(), exc.message)
                    return False
                self.state.record(ref.instance_uid, f"failed:{exc.code}")
                log.warning("%s refused: [%s] %s", ref.describe(), exc.code, exc.message)
                continue
            except BaseException:
                self.state.release(ref.instance_uid)
                raise
            self.state.record(ref.instance_uid, f"job:{job_id}")
            if self.collect is not None:
                self.state.track_job(job_id, ref)
            self.submitted.append(job_id)
            log.info("%s: job %s", ref.describe(), job_id)
        return True

    def store_finished(self) -> None:
        """Store back the results of this watcher's finished jobs (upload mode)."""
        for job_id, ref in self.state.tracked_jobs().items():
            if self.stop.is_set():
                return
            try:
                objects = self.collect(job_id)
            except AexError as exc:  # failed, cancelled, expired: nothing to store
                log.warning(
                    "job %s on %s ended without results: [%s] %s", job_id, ref.describe(), exc.code, exc.message
                )
                self.state.untrack_job(job_id)
                continue
            if objects is None:
                continue
            if objects:
                log.info("job %s finished: storing its objects", job_id)
                store_results(self.settings.pacs, self.pacs, objects)  # logs what was stored
            self.state.untrack_job(job_id)
