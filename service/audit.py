"""The audit trail: one record per access (time, principal, action, job id, model, input sha256, HTTP status) in a Redis stream, and its reader.

Records go to the stream ``audit_key()`` with XADD, trimmed by age (MINID: older than
AEX_AUDIT_RETENTION_SECONDS) and by count (AEX_AUDIT_MAX_RECORDS). Every field is checked
against its shape before it is written (a job id is 32 hex digits, a digest 64, an action a
route template ...): a value of another shape is dropped, so nothing a client typed, and no
patient attribute, can reach the trail. The model is recorded only when it is one the service
serves (``known_models``, the API's catalogue); any other name a client typed (a model that
does not exist, which may hold an identifier) is recorded as ``unknown``, never as typed. ``AuditMiddleware`` writes one record per request
under ``/v1/`` and ``/metrics`` (refused ones included: principal ``anonymous``, status
401/403); a route adds the model and the input's sha256 with ``note(request, ...)``.

The trail is a security control, so it fails closed:

- The record of a request is written before its answer leaves: the middleware holds the
  response's start, writes the record with its final status, and only then lets the answer
  go. When the record cannot be written (Redis out of memory, a read-only replica, an ACL
  refusal, unreachable), the answer is replaced by 503 ``store_unavailable`` with
  ``Retry-After``: no answer is served without its record. The cost is one Redis round trip
  (an XADD on the API's connection, well under a millisecond on a local socket) before each
  answer instead of after it; it used to be written after the response and its failures only
  logged, which served requests whose records were lost. A route that runs in the thread pool
  anyway (the job routes) writes it itself as its last step, with the status of the answer it
  returns (``record_answer``; it and the middleware live in ``service.audit_answer``), and the
  middleware lets that answer go as it is: the same record at the same point, without a trip
  into the pool of its own. A classify goes one step further: the record of its 200 is sent
  with its wait for the job's end and written by Redis only if the job finished
  (``AnswerAhead``; its time Redis's clock then), without a round trip or a sync to disk of
  its own; an answer that turns out otherwise is recorded with its own status, which
  replaces the record written first in the same transaction. It is not moved after the answer
  to save its round trip: a process that died between the answer and the record would leave
  the pending record (status 503) as the only record of a request whose client was answered
  (200, say), and the trail would tell another status than the client got.
- A mutating request (POST, PUT, PATCH, DELETE) also leaves a record before it acts: once its
  principal holds the route's scope, the guard calls ``before_acting``, which writes a
  pending record (principal, action, the job of the path; status 503) to the hash
  ``audit_key() + ":pending"``. When that write is refused, so is the request (503), before
  anything was done. A submission (classify, explain) sends it instead as the first command
  of its own first write (``owed_record``: the same step as its job or its reused result), so
  it costs no round trip of its own and still comes before anything the request does. The
  final record replaces the pending one in one transaction (XADD and HDEL). A pending record whose request never wrote its final one (the store refused it after
  the job was queued, or the process died) is moved into the stream as it is, status 503 (what
  the client was answered), by the next write ``ORPHAN_AFTER_SECONDS`` later or more: the
  trail never misses an access that acted, at the price of such a record coming after later
  ones and lacking what the route noted after it began (model, input sha256, a new job's id).

Torch-free.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Any

from redis import Redis

from jobs.keys import api_keys_revision_key, audit_key
from jobs.scripts import Script
from service.audit_since import parse_since, position
from service.metrics import method_label, route_label

log = logging.getLogger("aex.audit")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MODEL = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
ACTION = re.compile(r"^[A-Za-z]{3,7} [A-Za-z0-9_./{}-]{1,120}$|^[a-z_.]{1,60}$")
MAX_PRINCIPAL = 200
MAX_READ = 10_000
ANONYMOUS = "anonymous"
UNKNOWN_MODEL = "unknown"  # recorded for a model name the service does not serve
AUDITED_PREFIXES = ("/v1/", "/metrics")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PENDING_STATUS = 503  # what a client whose final record could not be written is answered
ORPHAN_AFTER_SECONDS = 3600  # longer than any request (body time-out plus the classify wait)
SWEEP_INTERVAL_SECONDS = 60.0

# Moves one pending record into the stream, once: only the caller that removes it adds it.
MOVE_PENDING = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
  return 1
end
return 0
"""


# KEYS[1]: the API keys' revision, KEYS[2]: the pending records; ARGV: the revision expected,
# the record's id, the record. Writes it only while the revision is the one expected.
BEGIN_IF_KEYS_UNCHANGED = Script(
    """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
)


def pending_key() -> str:
    """The hash of the records of mutating requests that have not written their final one."""
    return audit_key() + ":pending"


def _shaped(value: Any, pattern: re.Pattern) -> str | None:
    return value if isinstance(value, str) and pattern.match(value) else None


def _principal(value: Any) -> str:
    label = getattr(value, "label", value)
    if not isinstance(label, str) or not label:
        return ANONYMOUS
    return "".join(c for c in label if c.isprintable())[:MAX_PRINCIPAL]


class AuditLog:
    """Appends records to, and reads them from, the audit stream on one Redis connection.
    ``orphan_after_seconds``: how old a pending record must be to be moved into the stream.
    ``known_models``: the names of the served models (None: none is known, every model name
    is recorded as ``unknown``)."""

    def __init__(
        self,
        conn: Redis,
        retention_seconds: int = 30 * 86400,
        max_records: int = 1_000_000,
        orphan_after_seconds: float = ORPHAN_AFTER_SECONDS,
        known_models: Callable[[], Collection[str]] | None = None,
    ):
        self.conn, self.retention_seconds, self.max_records = conn, int(retention_seconds), int(max_records)
        self.orphan_after_seconds = float(orphan_after_seconds)
        self.known_models = known_models
        self._next_sweep = 0.0
        self._move = conn.register_script(MOVE_PENDING)

    @classmethod
    def from_settings(cls, conn: Redis, settings, catalogue=None) -> AuditLog:
        """``catalogue``: the API's ``Catalogue``, whose served names alone are recorded."""
        known = (lambda: catalogue.models(conn)) if catalogue is not None else None
        return cls(conn, settings.audit_retention_seconds, settings.audit_max_records, known_models=known)

    def served_model(self, model: Any) -> str | None:
        """``model`` when the service serves it, ``unknown`` for any other name, None for none."""
        if not model:
            return None
        try:
            known = self.known_models() if self.known_models is not None else ()
        except Exception as exc:  # the catalogue unreadable: the name cannot be told served
            log.warning("the served models could not be read for the audit record: %s", type(exc).__name__)
            known = ()
        return model if isinstance(model, str) and model in known else UNKNOWN_MODEL

    def record(self, principal: Any, action: str, status: int, **facts: Any) -> str:
        """Append one record; returns its stream id. ``principal``: a Principal, its label,
        or None (a refused request: ``anonymous``); ``facts``: the job id, model, input
        sha256, pending and replaced records of ``writing``. Raises the Redis error when the
        store refuses it."""
        with self.conn.pipeline(transaction=True) as pipe:
            self.writing(principal, action, status, **facts)(pipe)
            stream_id = pipe.execute()[0]
        self.written()
        return stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)

    def writing(
        self,
        principal: Any,
        action: str,
        status: int,
        job_id: str | None = None,
        model: str | None = None,
        input_sha256: str | None = None,
        pending: str | None = None,
        replaces: str | None = None,
        time_text: str | None = None,
    ) -> Callable[[Any], None]:
        """The writes of one record as ``fill(pipe)`` (``record`` runs them in a
        transaction; the first command, the XADD, replies with the record's id); call
        ``written`` once they are. ``model``: recorded only when served (``served_model``).
        ``pending``: the id ``begin`` gave this request's pending record, removed with it.
        ``replaces``: the id of a record of this request written first with a status it was
        not answered, removed with it. ``time_text``: the record's time as written (a
        stand-in the writing script replaces with its clock, ``jobs.rqueue.wait_for_end``);
        None: now."""
        now_ms = int(time.time() * 1000)
        fields = _fields(now_ms, principal, action, status, job_id, self.served_model(model), input_sha256)
        if time_text is not None:
            fields["time"] = time_text
        cutoff = max(0, now_ms - self.retention_seconds * 1000)

        def fill(pipe) -> None:
            pipe.xadd(audit_key(), fields, minid=f"{cutoff}-0", approximate=True)
            pipe.xtrim(audit_key(), maxlen=self.max_records, approximate=True)
            if pending:
                pipe.hdel(pending_key(), pending)
            if replaces:
                pipe.xdel(audit_key(), replaces)

        return fill

    def written(self) -> None:
        """After a record was written: the orphaned pending records moved now and then."""
        self._sweep_now_and_then()

    def pending_record(self, principal: Any, action: str, job_id: str | None = None) -> tuple[str, str]:
        """(id, record) of a mutating request's pending record, for ``begin`` or for the
        request's first write (``pending_command``)."""
        now_ms = int(time.time() * 1000)
        fields = _fields(now_ms, principal, action, PENDING_STATUS, job_id, None, None)
        return uuid.uuid4().hex, json.dumps({"ms": now_ms, "fields": fields})

    def begin(self, principal: Any, action: str, job_id: str | None = None, revision: str | None = None) -> str | None:
        """Write the pending record of a mutating request before it acts; returns its id.
        Raises the Redis error when the store refuses it (the request must not act then).
        ``revision``: the API keys' revision the request's principal was looked up at (a
        cached lookup, ``service.auth.apikeys``), confirmed in the same round trip: None, and
        nothing written, when the keys have changed since."""
        pending, record = self.pending_record(principal, action, job_id)
        if revision is None:
            self.conn.hset(pending_key(), pending, record)
            return pending
        written = BEGIN_IF_KEYS_UNCHANGED(
            self.conn, [api_keys_revision_key(), pending_key()], [revision, pending, record]
        )
        return pending if written else None

    def probe(self) -> None:
        """Raise the Redis error when the trail cannot be written now (``/readyz``): a field
        of the pending hash set and removed in one transaction, never seen by a reader."""
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.hset(pending_key(), "ready-probe", "{}")
            pipe.hdel(pending_key(), "ready-probe")
            pipe.execute()

    def sweep(self) -> int:
        """Move the pending records older than ``orphan_after_seconds`` into the stream (each
        once, even with several API processes sweeping); returns how many this call moved."""
        cutoff_ms = (time.time() - self.orphan_after_seconds) * 1000
        moved = 0
        for pending, text in self.conn.hgetall(pending_key()).items():
            try:
                entry = json.loads(text)
                ms, fields = int(entry["ms"]), dict(entry["fields"])
            except (ValueError, KeyError, TypeError):
                ms, fields = 0, {"time": "", "principal": ANONYMOUS, "action": "unknown", "status": "0"}
            if ms > cutoff_ms:
                continue
            values = [str(x) for kv in fields.items() for x in kv]
            moved += int(self._move(keys=[pending_key(), audit_key()], args=[pending, *values]))
        return moved

    def _sweep_now_and_then(self) -> None:
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL_SECONDS
        try:
            self.sweep()
        except Exception as exc:  # its own record is written; the orphans wait for the next sweep
            log.error("could not move pending audit records into the trail: %s", type(exc).__name__)

    def read(self, since: str | None = None, until: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Records from ``since`` (see ``parse_since``; None: the oldest kept) to ``until``,
        oldest first, at most ``limit`` (1 to 10000). Each carries its stream ``id``: pass
        the last one as ``since`` to read on."""
        limit = max(1, min(int(limit), MAX_READ))
        # Trimming is approximate (whole stream nodes): older records are not read either.
        cutoff = f"{max(0, int(time.time() * 1000) - self.retention_seconds * 1000)}-0"
        start = parse_since(since) if since else cutoff
        if position(start) < position(cutoff):
            start = cutoff
        end = parse_since(until) if until else "+"
        rows = self.conn.xrange(audit_key(), min=start, max=end, count=limit)
        return [_decode(stream_id, fields) for stream_id, fields in rows]


def _fields(
    now_ms: int,
    principal: Any,
    action: str,
    status: int,
    job_id: str | None,
    model: str | None,
    input_sha256: str | None,
) -> dict[str, str]:
    """A record's fields, each checked against its shape."""
    return {
        "time": datetime.fromtimestamp(now_ms / 1000, UTC).isoformat(timespec="milliseconds"),
        "principal": _principal(principal),
        "action": _shaped(action, ACTION) or "unknown",
        "job_id": _shaped(job_id, JOB_ID) or "",
        "model": _shaped(model, MODEL) or "",
        "input_sha256": _shaped(input_sha256, SHA256) or "",
        "status": str(int(status)) if isinstance(status, int) and 100 <= status <= 599 else "0",
    }


def _decode(stream_id: bytes | str, fields: dict) -> dict[str, Any]:
    text = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    status = text.get("status", "0")
    return {
        "id": stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id),
        "time": text.get("time"),
        "principal": text.get("principal"),
        "action": text.get("action"),
        "job_id": text.get("job_id") or None,
        "model": text.get("model") or None,
        "input_sha256": text.get("input_sha256") or None,
        "status": int(status) if status.isdigit() else None,
    }


def to_json_lines(records: list[dict[str, Any]]) -> str:
    """The records as JSON lines (one object a line), as ``GET /v1/audit`` and ``aex audit`` give them."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def note(request, job_id: str | None = None, model: str | None = None, input_sha256: str | None = None) -> None:
    """Add facts to the request's audit record (a route calls it once it knows them)."""
    facts = getattr(request.state, "audit", None) or {}
    facts.update({k: v for k, v in (("job_id", job_id), ("model", model), ("input_sha256", input_sha256)) if v})
    request.state.audit = facts


def action_of(scope) -> str:
    """A request's action: its method and the route template (``GET /v1/jobs/{job_id}``)."""
    return f"{method_label(scope.get('method', ''))} {route_label(scope)}"


def pending_command(pending: str, record: str) -> list[str]:
    """The command that writes a pending record (``AuditLog.pending_record``)."""
    return ["HSET", pending_key(), pending, record]


def owed_record(request) -> list[str] | None:
    """The pending record a mutating request owes before it acts, as the command that writes
    it (``pending_command``), for a route that sends it first in its first write (its id is
    kept for the final record, which replaces it); None when it owes none."""
    state = request.state
    audit: AuditLog | None = getattr(state, "audit_log", None)
    if audit is None or request.method not in MUTATING or getattr(state, "audit_pending", None):
        return None
    job_id = (request.scope.get("path_params") or {}).get("job_id")
    pending, record = audit.pending_record(getattr(state, "principal", None), action_of(request.scope), job_id=job_id)
    state.audit_pending = pending
    return pending_command(pending, record)


def before_acting(request, revision: str | None = None) -> bool | None:
    """Write the pending record of a mutating request before it acts (the guard calls it once
    the principal holds the scope); a refusal raises, and the request is answered 503 without
    acting. Nothing for a read, or outside the audited paths (None). ``revision``: the API
    keys' revision to confirm with it (``AuditLog.begin``): False, and nothing written, when
    the keys changed; True when written."""
    state = request.state
    audit: AuditLog | None = getattr(state, "audit_log", None)
    if audit is None or request.method not in MUTATING or getattr(state, "audit_pending", None):
        return None
    job_id = (request.scope.get("path_params") or {}).get("job_id")
    pending = audit.begin(getattr(state, "principal", None), action_of(request.scope), job_id=job_id, revision=revision)
    state.audit_pending = pending
    return pending is not None
