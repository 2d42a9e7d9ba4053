"""Job states as the API shows them (rq's statuses map to them in ``jobs.rqueue.layout``)."""

from __future__ import annotations

from enum import Enum


class ApiStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({ApiStatus.FINISHED, ApiStatus.FAILED, ApiStatus.CANCELLED})
