"""The audit trail: one record per access (time, principal, action, job id, model, input sha256, HTTP status) in a Redis stream, and its reader.

Records go to the stream ``audit_key()`` with XADD, trimmed by age (MINID: older than
AEX_AUDIT_RETENTION_SECONDS) and by count (AEX_AUDIT_MAX_RECORDS). Every field is checked
against its shape before it is written (a job id is 32 hex digits, a digest 64, an action a
route template ...): a value of another shape is dropped, so nothing a client typed, and no
patient attribute, can reach the trail. ``AuditMiddleware`` writes one record per request
under ``/v1/`` and ``/metrics`` (refused ones included: principal ``anonymous``, status
401/403); a route adds the model and the input's sha256 with ``note(request, ...)``.
Torch-free.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from redis import Redis
from starlette.concurrency import run_in_threadpool

from jobs.keys import audit_key
from models.errors import BadParameterError
from service.metrics import method_label, route_label

log = logging.getLogger("aex.audit")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MODEL = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
ACTION = re.compile(r"^[A-Za-z]{3,7} [A-Za-z0-9_./{}-]{1,120}$|^[a-z_.]{1,60}$")
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
RELATIVE = re.compile(r"^(\d{1,9})\s*([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_PRINCIPAL = 200
MAX_READ = 10_000
MAX_STREAM_PART = 2**64 - 1
ANONYMOUS = "anonymous"
AUDITED_PREFIXES = ("/v1/", "/metrics")


def _shaped(value: Any, pattern: re.Pattern) -> str | None:
    return value if isinstance(value, str) and pattern.match(value) else None


def _principal(value: Any) -> str:
    label = getattr(value, "label", value)
    if not isinstance(label, str) or not label:
        return ANONYMOUS
    return "".join(c for c in label if c.isprintable())[:MAX_PRINCIPAL]


class AuditLog:
    """Appends records to, and reads them from, the audit stream on one Redis connection."""

    def __init__(self, conn: Redis, retention_seconds: int = 30 * 86400, max_records: int = 1_000_000):
        self.conn, self.retention_seconds, self.max_records = conn, int(retention_seconds), int(max_records)

    @classmethod
    def from_settings(cls, conn: Redis, settings) -> AuditLog:
        return cls(conn, settings.audit_retention_seconds, settings.audit_max_records)

    def record(
        self,
        principal: Any,
        action: str,
        status: int,
        job_id: str | None = None,
        model: str | None = None,
        input_sha256: str | None = None,
    ) -> str:
        """Append one record; returns its stream id. ``principal``: a Principal, its label,
        or None (a refused request: ``anonymous``)."""
        now_ms = int(time.time() * 1000)
        fields = {
            "time": datetime.fromtimestamp(now_ms / 1000, UTC).isoformat(timespec="milliseconds"),
            "principal": _principal(principal),
            "action": _shaped(action, ACTION) or "unknown",
            "job_id": _shaped(job_id, JOB_ID) or "",
            "model": _shaped(model, MODEL) or "",
            "input_sha256": _shaped(input_sha256, SHA256) or "",
            "status": str(int(status)) if isinstance(status, int) and 100 <= status <= 599 else "0",
        }
        cutoff = max(0, now_ms - self.retention_seconds * 1000)
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.xadd(audit_key(), fields, minid=f"{cutoff}-0", approximate=True)
            pipe.xtrim(audit_key(), maxlen=self.max_records, approximate=True)
            stream_id, _ = pipe.execute()
        return stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)

    def read(self, since: str | None = None, until: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Records from ``since`` (see ``parse_since``; None: the oldest kept) to ``until``,
        oldest first, at most ``limit`` (1 to 10000). Each carries its stream ``id``: pass
        the last one as ``since`` to read on."""
        limit = max(1, min(int(limit), MAX_READ))
        # Trimming is approximate (whole stream nodes): older records are not read either.
        cutoff = f"{max(0, int(time.time() * 1000) - self.retention_seconds * 1000)}-0"
        start = parse_since(since) if since else cutoff
        if _position(start) < _position(cutoff):
            start = cutoff
        end = parse_since(until) if until else "+"
        rows = self.conn.xrange(audit_key(), min=start, max=end, count=limit)
        return [_decode(stream_id, fields) for stream_id, fields in rows]


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


def _position(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.lstrip("(").partition("-")
    return int(ms), int(seq or 0)


def parse_since(text: str, now: datetime | None = None) -> str:
    """A stream position from ``text``: a duration back from now (``90s``, ``15m``, ``1h``,
    ``7d``), an ISO 8601 time (UTC when it names no zone), or a record id (``<ms>-<n>``,
    exclusive: the records after it)."""
    text = (text or "").strip()
    if STREAM_ID.match(text):
        if any(int(part) > MAX_STREAM_PART for part in text.split("-")):
            raise BadParameterError("a record id is <milliseconds>-<sequence>, each at most 2**64 - 1")
        return f"({text}"
    m = RELATIVE.match(text)
    if m:
        try:
            when = (now or datetime.now(UTC)) - timedelta(seconds=int(m.group(1)) * UNITS[m.group(2)])
        except OverflowError:  # before year 1: from the start
            return "0-0"
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise BadParameterError(
                f"since/until must be a duration (15m, 1h, 7d), an ISO 8601 time or a record id, not {text[:40]!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    return f"{max(0, int(when.timestamp() * 1000))}-0"


def to_json_lines(records: list[dict[str, Any]]) -> str:
    """The records as JSON lines (one object a line), as ``GET /v1/audit`` and ``aex audit`` give them."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def note(request, job_id: str | None = None, model: str | None = None, input_sha256: str | None = None) -> None:
    """Add facts to the request's audit record (a route calls it once it knows them)."""
    facts = getattr(request.state, "audit", None) or {}
    facts.update({k: v for k, v in (("job_id", job_id), ("model", model), ("input_sha256", input_sha256)) if v})
    request.state.audit = facts


class AuditMiddleware:
    """Pure ASGI middleware: one audit record per request under ``/v1/`` and ``/metrics``,
    written after the response with its final status. The action is the method and the route
    template (``GET /v1/jobs/{job_id}``), never the raw path."""

    def __init__(self, app, audit: AuditLog, prefixes: tuple[str, ...] = AUDITED_PREFIXES):
        self.app, self.audit, self.prefixes = app, audit, prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            await run_in_threadpool(self._write, scope, status)

    def _write(self, scope, status: int) -> None:
        state = scope.get("state") or {}
        facts = state.get("audit") or {}
        params = scope.get("path_params") or {}
        try:
            self.audit.record(
                state.get("principal"),
                f"{method_label(scope.get('method', ''))} {route_label(scope)}",
                status,
                job_id=facts.get("job_id") or params.get("job_id"),
                model=facts.get("model"),
                input_sha256=facts.get("input_sha256"),
            )
        except Exception as exc:  # the answer is sent: say so loudly, never fail the request
            log.error("could not write the audit record of a request: %s", type(exc).__name__)
