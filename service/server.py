"""How uvicorn serves the API: the connection limits and deadlines that come from Settings.

uvicorn bounds the requests it serves at once (``limit_concurrency``: 503 beyond) and the
idle time of a kept-alive connection, but neither the time a client takes to send a request's
head nor how many connections one client holds: a few hundred connections that trickle head
bytes from one address would fill the limit, and every other client would get 503. So
``LimitedH11Protocol``

- closes a connection whose request head has not arrived whole within
  AEX_HEAD_TIMEOUT_SECONDS of the connection (or of the previous response), however its bytes
  trickle (one timer, never pushed back by data); after a response, the rest of the request's
  unread body and the next head share that deadline (the body of a request still being served
  has the app's own, ``service.multipart``: 408 at AEX_BODY_TIMEOUT_SECONDS);
- resets a connection whose client does not read: one whose answer has waited for the client
  to take its bytes for AEX_BODY_TIMEOUT_SECONDS (uvicorn would wait for ever), or that was
  closed and still holds unsent bytes at the next head deadline (a close waits for them);
- counts the connections of each client (``client_group``: an IPv4 address, an IPv6 /64) and
  answers a connection beyond AEX_MAX_CONNECTIONS_PER_CLIENT at once, before reading anything,
  with 429 ``too_many_connections``, ``Retry-After`` and ``Connection: close``; such a
  connection never counts towards AEX_MAX_CONNECTIONS, so one client cannot fill it alone.
  The count is taken in ``connection_made`` and given back in ``connection_lost``, which
  asyncio calls exactly once for every transport whatever ends it (a close, a reset, an error);
- answers ``GET /healthz`` even when AEX_MAX_CONNECTIONS is reached: the process is alive, and
  an orchestrator that took the 503 for death would restart a service that is only busy
  (``/readyz`` still answers 503 then, which takes it out of a load balancer's rotation).

A refused connection is answered and then half-closed; what the client still sends is read
and dropped until it closes, or for REFUSAL_LINGER_SECONDS at most (closing a socket with
unread bytes would reset it, and the reset may destroy the answer before the client reads it;
RFC 9112, 9.6). At most AEX_MAX_CONNECTIONS_PER_CLIENT refused connections of one client
linger; beyond them a refused connection is reset at once, without an answer.

Behind a reverse proxy every client has the proxy's address: AEX_TRUSTED_PROXIES names the
proxies, whose connections are not counted per client (the proxy limits its own clients), and
whose ``X-Forwarded-For`` uvicorn believes (for the logs); nobody's is believed by default.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

from jobs.settings import Settings
from models.errors import TooManyConnectionsError
from service.errors import RETRY_AFTER, status_of

log = logging.getLogger(__name__)

# An idle keep-alive connection is closed after this long (uvicorn's default, stated here).
KEEP_ALIVE_SECONDS = 5
# Longest a refused connection is kept half-closed for its client to read the answer.
REFUSAL_LINGER_SECONDS = 2.0
# IPv6 clients are counted by this prefix: one host usually holds a whole /64 (SLAAC, privacy
# addresses) and may send from any address in it.
IPV6_CLIENT_PREFIX = 64
# The liveness probe, answered whatever the global limit says.
HEALTH_ROUTE = ("GET", "/healthz")


def peer_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's IP address, an IPv4-mapped IPv6 one (as a dual-stack socket shows an IPv4
    client) as the IPv4 address, without an IPv6 zone (``fe80::1%eth0``); None for what is no
    IP address (a Unix socket)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_group(host: str) -> str | None:
    """The client a peer address counts as: an IPv4 address as itself, an IPv6 address as its
    /64 network (``2001:db8:1:2::/64``); None for what is no IP address."""
    ip = peer_ip(host)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return None if ip is None else str(ip)


class ClientCounts:
    """The connections each client holds in one server, and its refused ones that linger.

    ``group_of(peer)`` is None for a peer that is not counted (a trusted proxy, a Unix socket).
    A client whose counts are both zero is forgotten, so the table is as large as the set of
    clients connected now."""

    def __init__(self, per_client: int, trusted_proxies: list[str]) -> None:
        self.per_client = per_client
        self.trusted = [ipaddress.ip_network(n) for n in trusted_proxies]
        self.open: dict[str, int] = {}
        self.lingering: dict[str, int] = {}

    def group_of(self, peer: tuple[str, int] | None) -> str | None:
        ip = None if peer is None else peer_ip(peer[0])
        if ip is None or any(ip in net for net in self.trusted):
            return None
        return client_group(str(ip))

    def take(self, table: dict[str, int], group: str) -> bool:
        """Count one more connection of ``group`` in ``table`` (``open`` or ``lingering``),
        unless it holds ``per_client`` already (False)."""
        held = table.get(group, 0)
        if held >= self.per_client:
            return False
        table[group] = held + 1
        return True

    def give_back(self, table: dict[str, int], group: str) -> None:
        held = table[group] - 1
        if held:
            table[group] = held
        else:
            del table[group]


def refusal_bytes() -> bytes:
    """The whole HTTP/1.1 answer to a connection beyond its client's limit: 429
    ``too_many_connections`` with ``Retry-After``, closing the connection."""
    code = TooManyConnectionsError.code
    message = (
        "this client holds as many connections as one client may (AEX_MAX_CONNECTIONS_PER_CLIENT): "
        "close one, or try again later"
    )
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    status = status_of(code)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: {RETRY_AFTER[code]}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class CoalescedWrites:
    """A connection's transport whose writes within one turn of the event loop leave as one.
    uvicorn's h11 cycle writes a response's head and its body apart: two sends and two TCP
    segments (on loopback each send also runs the receiver's side of the stack) where one
    does, at every answer. Everything else is the transport's own; ``close`` sends what is
    pending first."""

    __slots__ = ("_transport", "_loop", "_parts")

    def __init__(self, transport, loop) -> None:
        self._transport, self._loop, self._parts = transport, loop, []

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self._flush)
        self._parts.append(data)

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        if parts and not self._transport.is_closing():
            self._transport.write(b"".join(parts))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._parts))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline, a limit per client and ``/healthz`` always
    answered (see the module docstring). ``server_options`` makes a subclass per server that
    sets ``head_timeout`` (seconds) and ``counts`` (shared by that server's connections)."""

    head_timeout: float = 10.0
    write_timeout: float = 30.0
    counts: ClientCounts
    refusal: bytes = b""

    _head_timer = None
    _write_timer = None
    _linger_timer = None
    _group: str | None = None  # the client this open connection is counted against
    _lingering: str | None = None  # the client this refused connection is counted against
    _refused = False
    _limit: int | None = None

    # uvicorn reads limit_concurrency right after it has parsed a request head into self.scope,
    # and answers 503 when the server is full; None there lets the liveness probe through.
    @property  # type: ignore[override]
    def limit_concurrency(self) -> int | None:
        scope = self.scope
        if scope is not None and (scope["method"], scope["path"]) == HEALTH_ROUTE:
            return None
        return self._limit

    @limit_concurrency.setter
    def limit_concurrency(self, value: int | None) -> None:
        self._limit = value

    def connection_made(self, transport) -> None:  # type: ignore[override]
        group = self.counts.group_of(get_remote_addr(transport))
        if group is not None:
            if not self.counts.take(self.counts.open, group):
                self._refuse(transport, group)
                return
            self._group = group  # given back in connection_lost, whatever happens next
        super().connection_made(CoalescedWrites(transport, self.loop))
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the request of a refused connection: read only so that closing cannot reset
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # the next request on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            self._end_refusal()
            return
        try:
            self._cancel_head_timer()
            self._cancel_write_timer()
            super().connection_lost(exc)
        finally:
            if self._group is not None:
                self.counts.give_back(self.counts.open, self._group)
                self._group = None

    def _refuse(self, transport, group: str) -> None:
        self._refused = True
        self.transport = transport
        if not self.counts.take(self.counts.lingering, group):
            transport.abort()  # this client is refused faster than its refusals can linger
            return
        self._lingering = group
        first = self.counts.lingering[group] == 1
        if first:  # once per burst of refusals, not once per connection
            log.warning(
                "client %s holds %d connections, its limit (AEX_MAX_CONNECTIONS_PER_CLIENT): more are refused",
                group,
                self.counts.per_client,
            )
        transport.write(self.refusal)
        if transport.can_write_eof():
            transport.write_eof()
            self._linger_timer = self.loop.call_later(REFUSAL_LINGER_SECONDS, transport.close)
        else:  # TLS cannot half-close
            transport.close()

    def _end_refusal(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._lingering is not None:
            self.counts.give_back(self.counts.lingering, self._lingering)
            self._lingering = None

    def pause_writing(self) -> None:
        # The client takes our bytes slower than we send them (uvicorn's send waits, unbounded).
        if self._refused:
            return  # a refusal is a few hundred bytes, written once
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        if self._refused:
            return
        self._cancel_write_timer()
        super().resume_writing()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _arm_head_timer(self) -> None:
        # Armed on a closing connection too (after a Connection: close answer): one that is not
        # gone by the deadline holds bytes its client does not take.
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_deadline)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            self.transport.abort()  # closed a deadline ago, its last bytes still not taken
            return
        # IDLE: no whole request head since the connection or the last response. Our side DONE:
        # the request was answered and the client is still sending its body, which no one reads.
        if self.conn.their_state is h11.IDLE or self.conn.our_state is h11.DONE:
            self.transport.close()
            self._arm_head_timer()  # a close waits for unsent bytes: reset if they are still there


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.Config`` that bound what clients can hold: at most
    AEX_MAX_CONNECTIONS connections and requests at once (beyond it uvicorn answers 503 at
    once, ``GET /healthz`` excepted), at most AEX_MAX_CONNECTIONS_PER_CLIENT of them from one
    client (beyond it 429 at once), a request head within AEX_HEAD_TIMEOUT_SECONDS (else the
    connection is closed), a client that takes none of an answer for AEX_BODY_TIMEOUT_SECONDS
    reset, idle keep-alive connections closed after KEEP_ALIVE_SECONDS, no
    WebSocket upgrades (the API has none; an upgraded connection would leave the counts),
    ``X-Forwarded-For`` believed from AEX_TRUSTED_PROXIES only. Each call makes a new count
    table: call it once per server."""
    attributes = {
        "head_timeout": settings.head_timeout_seconds,
        "write_timeout": settings.body_timeout_seconds,
        "counts": ClientCounts(settings.connections_per_client(), settings.trusted_proxies),
        "refusal": refusal_bytes(),
    }
    if settings.trusted_proxies:
        log.info(
            "connections from the trusted proxies %s are not limited per client: limit clients in the proxy",
            ", ".join(settings.trusted_proxies),
        )
    return {
        "http": type("LimitedH11Protocol", (LimitedH11Protocol,), attributes),
        "ws": "none",
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": ",".join(settings.trusted_proxies),
    }
