"""Redis round trips counted: every request a client sends to Redis and waits for (a command, or a whole
pipeline or transaction) counted once, per process and per unit of work (an API request, a worker's job).

``jobs.queues.connect`` makes every connection of its client a counting one (``counting``): its
``send_packed_command`` (one write per round trip: redis-py sends a pipeline's commands in one
write, each command of a WATCH block on its own) adds one to the process's total and to the
``Tally`` of the work in hand, if any (``tallying``: a context variable, so an API request's
threads count into its own tally). It costs an increment under a lock, against tens of
microseconds for the round trip itself. The API sends each request's count in its
``Server-Timing`` header (``service.timing``); a worker publishes its total in its registration
(``jobs.rqueue.worker``); ``bench/bench_latency.py`` reads both. Torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from redis import Redis


class Tally:
    """Round trips of one unit of work (``count``)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


_lock = threading.Lock()
_process = Tally()
_current: ContextVar[Tally | None] = ContextVar("aex_redis_round_trips", default=None)


def _counted() -> None:
    with _lock:
        _process.count += 1
        tally = _current.get()
        if tally is not None:
            tally.count += 1


def process_total() -> int:
    """Round trips this process has sent since it started."""
    return _process.count


@contextmanager
def tallying(tally: Tally) -> Iterator[Tally]:
    """Count the round trips of the block (and of the threads it starts with this context) in ``tally`` too."""
    token = _current.set(tally)
    try:
        yield tally
    finally:
        _current.reset(token)


_classes: dict[type, type] = {}


def _counting_class(base: type) -> type:
    """``base`` (a redis-py connection class) whose every send is counted."""
    if base not in _classes:

        def send_packed_command(self, command, check_health=True):
            _counted()
            return base.send_packed_command(self, command, check_health)

        _classes[base] = type(f"Counting{base.__name__}", (base,), {"send_packed_command": send_packed_command})
    return _classes[base]


def counting(conn: Redis) -> Redis:
    """``conn`` with every connection its pool makes from now on counting its round trips (call it before the
    first command: connections already made are not counted)."""
    pool = conn.connection_pool
    pool.connection_class = _counting_class(pool.connection_class)
    return conn
