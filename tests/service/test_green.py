"""redis-py's blocking client run inside the event loop (service/green.py), on the session's real Redis: blocking as before outside ``run_green``; inside it, each wait awaited on the loop (many requests wait at once on one thread, the loop runs on), with the socket's timeout, the retries' pauses awaited, the caller's context, and a cancelled request's connection dropped rather than handed on with a reply half read."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest
import redis.exceptions

from jobs.queues import connect
from service.green import LOOP_UPLOAD_BYTES, make_green, off_loop, run_green

DB = 13


@pytest.fixture
def green(redis_server, conn):
    """A greenable client on the test's database (emptied by ``conn``), as the API makes its own."""
    client = connect(f"{redis_server.url}?db={DB}", socket_timeout=30.0)
    assert make_green(client)
    yield client
    client.close()


class Ticker:
    """Counts the loop's turns while the test runs: a loop blocked by a wait stops it."""

    def __init__(self):
        self.ticks = 0

    async def run(self):
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1


def raising_while_the_loop_runs(error: type[BaseException], fn, *args) -> tuple[float, int]:
    """``run_green(fn, *args)`` run to ``error``: (its seconds, the loop's turns meanwhile)."""

    async def main():
        ticker = Ticker()
        ticking = asyncio.create_task(ticker.run())
        start = time.monotonic()
        with pytest.raises(error):
            await run_green(fn, *args)
        elapsed = time.monotonic() - start
        ticking.cancel()
        return elapsed, ticker.ticks

    return asyncio.run(main())


def test_outside_run_green_the_client_blocks_as_before(green):
    green.set("k", b"v")
    assert green.get("k") == b"v"
    start = time.monotonic()
    assert green.blpop(["empty"], timeout=0.3) is None
    assert time.monotonic() - start >= 0.25
    # From another thread too (the thread pool, a callback's thread).
    out = []
    t = threading.Thread(target=lambda: out.append(green.get("k")))
    t.start()
    t.join()
    assert out == [b"v"]


def test_many_blocking_waits_share_the_loop_thread(green, conn):
    n = 12
    ran_on = set()

    def wait(i: int) -> bytes:
        # A blocking pop, as a submission's wait for its job's end blocks.
        ran_on.add(threading.get_ident())
        return green.blpop([f"list:{i}"], timeout=10)[1]

    async def main():
        ticker = Ticker()
        ticking = asyncio.create_task(ticker.run())
        waits = [asyncio.create_task(run_green(wait, i)) for i in range(n)]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waits)
        assert ticker.ticks >= 10  # the loop ran while every one of them waited
        assert ran_on == {threading.get_ident()}  # all of them on the loop's thread
        for i in reversed(range(n)):  # answered in the opposite order: each wakes on its own
            await asyncio.to_thread(conn.rpush, f"list:{i}", f"value {i}")
        got = await asyncio.wait_for(asyncio.gather(*waits), 5)
        ticking.cancel()
        return got

    assert asyncio.run(main()) == [f"value {i}".encode() for i in range(n)]


def test_the_socket_timeout_holds_inside_and_the_loop_runs_meanwhile(redis_server, conn):
    client = connect(f"{redis_server.url}?db={DB}", socket_timeout=0.3)
    assert make_green(client)
    # BLPOP 0 blocks forever: the socket's timeout ends it.
    elapsed, ticks = raising_while_the_loop_runs(redis.exceptions.TimeoutError, client.blpop, ["never"], 0)
    assert 0.25 <= elapsed < 5
    assert ticks >= 10
    client.set("after", b"1")  # the timed-out connection was dropped, not reused half-read
    assert client.get("after") == b"1"
    client.close()


def test_a_cancelled_wait_drops_its_connection(green, conn):
    async def main():
        waiting = asyncio.create_task(run_green(lambda: green.blpop(["list:c"], timeout=10)))
        await asyncio.sleep(0.3)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    # Its connection was closed with it: Redis holds no blocked pop of this database (one
    # left would hold it until its timeout), so the value pushed now stays; and the pool's
    # next command reads its own reply.
    deadline = time.monotonic() + 5
    while any(c.get("db") == str(DB) and c.get("cmd") == "blpop" for c in conn.client_list()):
        assert time.monotonic() < deadline, "the cancelled wait's connection is still blocked in Redis"
        time.sleep(0.02)
    conn.rpush("list:c", b"kept")
    assert conn.llen("list:c") == 1
    assert green.lrange("list:c", 0, -1) == [b"kept"]


def test_retry_pauses_are_awaited_not_slept(tmp_path):
    # No server at this path: each attempt fails at once, then redis-py's Retry pauses
    # (0.05, 0.1, 0.2, 0.4 s... about a second with retry_seconds=1) before the next.
    client = connect(f"unix://{tmp_path}/absent.sock", socket_timeout=1.0, retry_seconds=1)
    assert make_green(client)
    elapsed, ticks = raising_while_the_loop_runs(redis.exceptions.ConnectionError, client.get, "k")
    assert elapsed >= 0.5  # it did pause between attempts
    assert ticks >= 0.5 * elapsed / 0.01  # and the loop ran through the pauses


def test_the_callers_context_is_seen_errors_are_raised_and_large_uploads_keep_the_pool(green):
    var = contextvars.ContextVar("var", default="unset")
    ran_on = []

    def inside():
        ran_on.append(threading.get_ident())
        green.set("ctx", var.get())
        return green.get("ctx")

    async def main():
        var.set("request's")
        got = await off_loop(True, 100, inside)
        with pytest.raises(ZeroDivisionError):
            await off_loop(True, 100, lambda: 1 / 0)
        pooled = await off_loop(False, 100, inside)  # the thread pool, as for a TLS store
        large = await off_loop(True, LOOP_UPLOAD_BYTES + 1, inside)  # the thread pool too
        return got, pooled, large

    assert asyncio.run(main()) == (b"request's",) * 3
    loop_thread = threading.get_ident()  # asyncio.run's loop runs on this thread
    assert ran_on[0] == loop_thread and ran_on[1] != loop_thread and ran_on[2] != loop_thread


def test_tls_connections_keep_the_thread_pool():
    client = connect("rediss://localhost:6390/0")
    assert not make_green(client)
    assert "Green" not in client.connection_pool.connection_class.__name__


def test_a_store_that_comes_back_during_the_retries_answers(tmp_path):
    # The first attempts find no server (their connections fail in a thread, as new
    # connections are made); the store starts meanwhile, and the command's retry succeeds:
    # the failed attempts are the retries' business, not the request's error.
    from aex.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis")
    client = connect(server.url, socket_timeout=5.0, retry_seconds=10)
    assert make_green(client)

    async def main():
        starting = asyncio.get_running_loop().call_later(0.3, server.start)
        try:
            return await run_green(client.set, "k", b"v")
        finally:
            starting.cancel()

    try:
        assert asyncio.run(main()) is True
        assert client.get("k") == b"v"
    finally:
        client.close()
        server.stop()
