"""redis-py's blocking client run inside the event loop: its socket waits handed to the loop from a greenlet (for ``bench_floor.py``'s bare server only).

The service's API runs each classify's job-store work (its two Redis round trips) in one trip
into Starlette's thread pool, on redis-py's blocking client. Run instead in a greenlet inside
the event loop, the same blocking code needs no thread: ``GreenSocket`` turns each wait of
the connection's socket into a switch to the greenlet's parent, ``run_green``, which awaits the
socket's readiness on the loop and switches back. The code that calls Redis is unchanged;
only the waiting moves. ``bench_floor.py`` measures what that saves per request against the
thread pool and against redis-py's asyncio client, on the bare server. Not used by aex: a
TLS socket, redis-py's retries with their sleeps, and a request cancelled mid-wait would each
need handling there first.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent, greenlet
from redis import ConnectionPool, Redis
from redis.connection import UnixDomainSocketConnection


class _Wait:
    """A green call's request to its driver: wait until ``fd`` is readable (or writable)."""

    __slots__ = ("fd", "write", "timeout")

    def __init__(self, fd: int, write: bool, timeout: float | None):
        self.fd, self.write, self.timeout = fd, write, timeout


class GreenSocket:
    """A non-blocking socket that keeps the blocking socket's interface (timeouts included):
    a wait inside ``run_green`` is a switch to the loop, elsewhere a ``select``."""

    def __init__(self, sock: socket.socket):
        self._sock, self._timeout = sock, sock.gettimeout()
        sock.setblocking(False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def _ready(self, write: bool) -> bool:
        current = getcurrent()
        if getattr(current, "aex_green", False):
            return current.parent.switch(_Wait(self._sock.fileno(), write, self._timeout))
        ready = (
            select.select([], [self._sock], [], self._timeout)
            if write
            else select.select([self._sock], [], [], self._timeout)
        )
        return any(ready)

    def _io(self, call: Callable[[], Any], write: bool) -> Any:
        while True:
            try:
                return call()
            except BlockingIOError:
                if self._timeout == 0:
                    raise
                if not self._ready(write):
                    raise TimeoutError("timed out") from None

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        return self._io(lambda: self._sock.recv_into(buffer, nbytes, flags), False)

    def recv(self, size: int, flags: int = 0) -> bytes:
        return self._io(lambda: self._sock.recv(size, flags), False)

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[self._io(lambda v=view: self._sock.send(v), True) :]


class GreenUnixConnection(UnixDomainSocketConnection):
    def _connect(self) -> GreenSocket:
        return GreenSocket(super()._connect())


def green_redis(path: str) -> Redis:
    """A blocking redis-py client on the Unix socket ``path`` whose waits ``run_green`` hands to the loop."""
    return Redis(connection_pool=ConnectionPool(connection_class=GreenUnixConnection, path=path))


async def run_green(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a greenlet of the running loop's thread; each socket wait of a
    ``GreenSocket`` in it is awaited on the loop. Returns its value, raises its error."""
    loop = asyncio.get_running_loop()
    child = greenlet(fn)
    child.aex_green = True
    value = child.switch(*args)
    while not child.dead:
        wait: _Wait = value
        ready = loop.create_future()
        add, remove = (loop.add_writer, loop.remove_writer) if wait.write else (loop.add_reader, loop.remove_reader)
        add(wait.fd, lambda f=ready: f.done() or f.set_result(True))
        try:
            async with asyncio.timeout(wait.timeout):
                await ready
        except TimeoutError:
            pass
        finally:
            remove(wait.fd)
        value = child.switch(ready.done())
    return value
