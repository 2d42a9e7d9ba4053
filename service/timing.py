"""The stages of an API request timed and sent back in its ``Server-Timing`` header (W3C Server Timing), with the
request's Redis round trips.

``ServerTimingMiddleware`` (pure ASGI, around the audit trail) gives each request under
``/v1/`` a ``Stages`` record in a context variable, so code anywhere in the request, in the
event loop or in the thread pool (Starlette copies the context into it), adds a stage with
``with stage("seal"): ...``; a stage entered twice adds up. When the response starts, the
header lists each stage in milliseconds (monotonic clock, this process), ``redis;desc=<n>``
(the round trips the request sent, ``jobs.roundtrips``) and ``total`` (from the middleware
to the response's start, the audit record's final write included). Outside a request,
``stage`` does nothing. A few microseconds a request; the header names stages, never data.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

from jobs.roundtrips import Tally, tallying

TIMED_PREFIXES = ("/v1/",)


class Stages:
    """The stages of one request: name -> seconds, in the order first entered."""

    __slots__ = ("parts", "start", "trips")

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.start = time.perf_counter()
        self.trips = Tally()

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds

    def header(self) -> bytes:
        """The ``Server-Timing`` value: each stage, the round trips, the total so far."""
        total = (time.perf_counter() - self.start) * 1e3
        items = [f"{name};dur={seconds * 1e3:.3f}" for name, seconds in self.parts.items()]
        items += [f"redis;desc={self.trips.count}", f"total;dur={total:.3f}"]
        return ", ".join(items).encode()


_current: ContextVar[Stages | None] = ContextVar("aex_request_stages", default=None)


class stage:  # lower case: used as a context manager, like contextlib's
    """``with stage(name):`` adds the block's time to the request's stage ``name``."""

    __slots__ = ("name", "stages", "t")

    def __init__(self, name: str):
        self.name, self.stages = name, _current.get()

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *_exc) -> None:
        if self.stages is not None:
            self.stages.add(self.name, time.perf_counter() - self.t)


class ServerTimingMiddleware:
    """Pure ASGI middleware: ``Server-Timing`` on every response under ``TIMED_PREFIXES``."""

    def __init__(self, app, prefixes: tuple[str, ...] = TIMED_PREFIXES):
        self.app, self.prefixes = app, prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        stages = Stages()

        async def send_timed(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"server-timing", stages.header())]
            await send(message)

        token = _current.set(stages)
        try:
            with tallying(stages.trips):
                await self.app(scope, receive, send_timed)
        finally:
            _current.reset(token)
