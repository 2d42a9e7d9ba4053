"""A submission's blocking job-store work run inside the event loop: redis-py's blocking client in a greenlet whose socket waits the loop awaits.

The API's classify and explain routes do their job-store work (admission, the enqueue script,
the wait for the end with its audit write) with redis-py's blocking client. Run in Starlette's
thread pool, each request pays a trip into a thread and back, and the thread's wake-ups
contend for the GIL with the loop: 0.12-0.16 ms of server CPU per request for three round
trips on a bare server (``bench/bench_floor.py``: 0.78 against 0.66 ms, 0.67 against 0.51 in
another run), and at 8 clients through ``aex serve`` the thread's trip back to the loop took
2-3 ms of each request's time (``docs/benchmarks.md``). ``run_green`` runs the
same code in a greenlet of the loop's thread instead. Its Redis connections are those of the
app's pool, made with ``greenable`` sockets (``make_green``): outside a greenlet of
``run_green`` they are the blocking sockets they were (the thread pool, a callback's thread);
inside one, each wait for the socket switches to the loop, which awaits the socket's readiness
(with the socket's own timeout) and switches back. Nothing else changes: the same commands,
errors, timeouts and retries.

What could block the loop inside is handed off: a new connection is made in a thread
(``connect`` can wait for seconds), and the pauses between a retry's attempts (redis-py's
``Retry``, while Redis restarts) are awaited (``GreenBackoff``). A threading lock must never be
held across a Redis call on this path (two greenlets of one thread would deadlock on it);
``service.catalogue`` reads outside its lock for that reason. A request cancelled while it
waits (the server stopping) has the exception thrown into its greenlet: redis-py drops the
connection it was using, so no half-read reply is handed to the next request.

Each submission waiting for its job holds a connection of the pool, as its thread did; the
thread pool's 40 threads no longer bound how many wait at once, ``AEX_MAX_CONNECTIONS`` does
(each connection serves one request at a time).

TLS connections (``rediss://``) keep the thread pool: an SSL socket's non-blocking reads fail
in their own way (want-read, want-write) that this does not handle.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import time
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent, greenlet
from redis import Redis
from redis.backoff import AbstractBackoff
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection
from starlette.concurrency import run_in_threadpool

# Connection classes whose sockets are plain (not TLS): the ones made greenable.
_PLAIN = (Connection, UnixDomainSocketConnection)
_classes: dict[type, type] = {}


class _Wait:
    """A green call's request to its driver: ``fd`` readable (or writable), at most ``timeout``
    seconds (None: no limit); answered True when it is, False at the timeout."""

    __slots__ = ("fd", "write", "timeout")

    def __init__(self, fd: int, write: bool, timeout: float | None):
        self.fd, self.write, self.timeout = fd, write, timeout


class _Call:
    """A green call's request to its driver: ``fn()`` run in a thread (answered with its value)
    or, ``fn`` None, a pause of ``seconds``."""

    __slots__ = ("fn", "seconds")

    def __init__(self, fn: Callable[[], Any] | None, seconds: float = 0.0):
        self.fn, self.seconds = fn, seconds


def _driver() -> greenlet | None:
    """The greenlet ``run_green`` drives, when the caller runs in one (else None)."""
    current = getcurrent()
    return current if getattr(current, "aex_green", False) else None


def _ask(request: _Wait | _Call) -> Any:
    """Hand ``request`` to the driver (the loop) and return its answer; an exception the
    driver throws in (a cancelled request) is raised here."""
    return getcurrent().parent.switch(request)


class GreenSocket:
    """A socket as redis-py uses it, blocking as before except inside ``run_green``: there a
    read or write that would block waits on the loop, within the socket's timeout."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _green(self, call: Callable[[], Any], write: bool) -> Any:
        """``call()`` on the socket made non-blocking for it, each would-block awaited on
        the loop; TimeoutError (``socket.timeout``) after the socket's timeout."""
        timeout = self._sock.gettimeout()
        if timeout == 0:  # a non-blocking check (redis-py's can_read): nothing to wait for
            return call()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._sock.settimeout(0.0)
        try:
            while True:
                try:
                    return call()
                except BlockingIOError:
                    left = None if deadline is None else deadline - time.monotonic()
                    if (left is not None and left <= 0) or not _ask(_Wait(self._sock.fileno(), write, left)):
                        raise TimeoutError("timed out") from None
        finally:
            self._sock.settimeout(timeout)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if _driver() is None:
            return self._sock.recv_into(buffer, nbytes, flags)
        return self._green(lambda: self._sock.recv_into(buffer, nbytes, flags), False)

    def recv(self, size: int, flags: int = 0) -> bytes:
        if _driver() is None:
            return self._sock.recv(size, flags)
        return self._green(lambda: self._sock.recv(size, flags), False)

    def sendall(self, data: Any) -> None:
        if _driver() is None:
            return self._sock.sendall(data)
        view = memoryview(data).cast("B")
        while view:
            view = view[self._green(lambda v=view: self._sock.send(v), True) :]
        return None


def _greenable(base: type) -> type:
    """``base`` (a plain redis-py connection class) whose sockets are ``GreenSocket``s, each
    made in a thread when asked for inside ``run_green``."""
    if base not in _classes:

        def _connect(self):
            if _driver() is None:
                return GreenSocket(base._connect(self))
            return GreenSocket(_ask(_Call(lambda: base._connect(self))))

        _classes[base] = type(f"Green{base.__name__}", (base,), {"_connect": _connect})
    return _classes[base]


class GreenBackoff(AbstractBackoff):
    """``inner``'s pauses between a retry's attempts, awaited on the loop inside ``run_green``
    (redis-py's ``Retry`` then sleeps 0), slept by ``Retry`` elsewhere."""

    def __init__(self, inner: AbstractBackoff):
        self.inner = inner

    def reset(self) -> None:
        self.inner.reset()

    def compute(self, failures: int) -> float:
        seconds = self.inner.compute(failures)
        if _driver() is None or seconds <= 0:
            return seconds
        _ask(_Call(None, seconds))
        return 0.0


def make_green(conn: Redis) -> bool:
    """Make ``conn``'s future connections greenable and its retries' pauses awaitable inside
    ``run_green`` (call it before the first command); False, and ``conn`` unchanged, when its
    connections are not plain sockets (TLS)."""
    pool = conn.connection_pool
    if not issubclass(pool.connection_class, _PLAIN) or issubclass(pool.connection_class, SSLConnection):
        return False
    pool.connection_class = _greenable(pool.connection_class)
    retry = pool.connection_kwargs.get("retry")
    if retry is not None and not isinstance(retry._backoff, GreenBackoff):
        retry._backoff = GreenBackoff(retry._backoff)  # the Retry the pool gives its connections
    return True


async def run_green(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a greenlet of the loop's thread, in a copy of the caller's context (as
    ``run_in_threadpool`` runs it); its waits are awaited here. Returns its value or raises
    its error; an exception raised here while it waits (a cancellation) is thrown into it."""
    loop = asyncio.get_running_loop()
    child = greenlet(fn)
    child.aex_green = True
    child.gr_context = contextvars.copy_context()
    request = child.switch(*args)
    cancelled: BaseException | None = None
    while not child.dead:
        try:
            answer = await _answer(loop, request)
        except BaseException as exc:  # the wait itself was cut short (a cancellation)
            cancelled = cancelled or exc
            request = child.throw(exc)  # redis-py drops the connection the exception meets
            continue
        # A call that failed in its thread (a connection refused while Redis restarts) fails
        # in the greenlet, where redis-py's retries see it; it is theirs to raise or not.
        request = child.throw(answer.error) if isinstance(answer, _Failed) else child.switch(answer)
    if cancelled is not None:  # a green call that caught it still ends with it here
        raise cancelled
    return request


class _Failed:
    """The answer to a ``_Call`` whose function raised ``error`` in its thread."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


async def _answer(loop: asyncio.AbstractEventLoop, request: _Wait | _Call) -> Any:
    if isinstance(request, _Call):
        if request.fn is None:
            await asyncio.sleep(request.seconds)
            return None
        try:
            return await run_in_threadpool(request.fn)
        except Exception as exc:
            return _Failed(exc)
    ready = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if request.write else (loop.add_reader, loop.remove_reader)
    add(request.fd, lambda: ready.done() or ready.set_result(True))
    try:
        async with asyncio.timeout(request.timeout):
            return await ready
    except TimeoutError:
        return False
    finally:
        remove(request.fd)


# The largest upload whose submission runs in the loop. Its admission decodes the image and
# its sealing encrypts it, in time that grows with its size and holds the loop (a thread
# gives the loop the GIL every few milliseconds): past this size that time dwarfs the thread
# pool's fraction of a millisecond, so the submission keeps the thread pool and the loop
# stays responsive. A photograph-sized PNG or a small DICOM runs in the loop.
LOOP_UPLOAD_BYTES = 256 * 1024


async def off_loop(green: bool, upload_bytes: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` (a submission's blocking job-store work, for an upload of
    ``upload_bytes``) in a greenlet of the loop when ``green`` (``make_green`` made the app's
    connection greenable) and the upload is at most ``LOOP_UPLOAD_BYTES``, else in the thread
    pool."""
    in_loop = green and upload_bytes <= LOOP_UPLOAD_BYTES
    return await (run_green(fn, *args) if in_loop else run_in_threadpool(fn, *args))
