"""The grammar of an audit query's bounds: ``since`` / ``until`` as a duration back from now, an ISO 8601 time or a record id, turned into a stream position."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from models.errors import BadParameterError

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
RELATIVE = re.compile(r"^(\d{1,9})\s*([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_STREAM_PART = 2**64 - 1


def position(stream_id: str) -> tuple[int, int]:
    """A stream position as (milliseconds, sequence), for comparing two of them."""
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
