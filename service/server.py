"""How uvicorn serves the API: the connection limits and timeouts that come from Settings.

uvicorn bounds the requests it serves at once (``limit_concurrency``: 503 beyond) and the
idle time of a kept-alive connection, but not the time a client takes to send a request's
head: a connection that sends part of one (or nothing) and stalls would count against the
limit for ever. ``HeadDeadlineProtocol`` closes it once AEX_BODY_TIMEOUT_SECONDS pass without
a whole head; the body's deadline is the app's own (``service.multipart``: 408).
"""

from __future__ import annotations

from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from jobs.settings import Settings

# An idle keep-alive connection is closed after this long (uvicorn's default, stated here).
KEEP_ALIVE_SECONDS = 5


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head has not arrived whole
    within ``head_timeout`` seconds of the connection (or of the previous response)."""

    head_timeout: float = 30.0
    _head_timer = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # the next request on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_deadline)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        # IDLE: no whole request head since the connection or the last response.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.Config`` that bound what clients can hold: at most
    AEX_MAX_CONNECTIONS connections and requests at once (beyond it uvicorn answers 503 at
    once), a request head within AEX_BODY_TIMEOUT_SECONDS (else the connection is closed),
    idle keep-alive connections closed after KEEP_ALIVE_SECONDS."""
    protocol = type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout": settings.body_timeout_seconds})
    return {
        "http": protocol,
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
    }
