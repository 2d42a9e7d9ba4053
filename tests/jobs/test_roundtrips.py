"""Redis round trips counted on a real Redis: a command, a pipeline, a transaction under WATCH, per tally and per
thread (``jobs.roundtrips``)."""

from __future__ import annotations

import contextvars
import threading

from jobs.roundtrips import Tally, process_total, tallying


def test_a_command_a_pipeline_and_a_watched_transaction(redis_db):
    conn = redis_db(5)
    conn.ping()  # the connection made (its handshake counts too)
    with tallying(Tally()) as tally:
        conn.set("a", 1)
        assert tally.count == 1
        with conn.pipeline(transaction=False) as pipe:
            for i in range(10):
                pipe.incr(f"k{i}")
            pipe.execute()
        assert tally.count == 2  # ten commands, one round trip
        with conn.pipeline() as pipe:  # WATCH, a read, MULTI/EXEC: three
            pipe.watch("a")
            pipe.get("a")
            pipe.multi()
            pipe.set("a", 2)
            pipe.incr("b")
            pipe.execute()
        assert tally.count == 5
    before = process_total()
    conn.get("a")  # outside any tally: the process's total only
    assert process_total() == before + 1 and tally.count == 5


def test_tallies_are_per_context_and_threads_count_into_the_one_they_carry(redis_db):
    conn = redis_db(5)
    conn.ping()
    outer, inner, seen = Tally(), Tally(), []
    with tallying(outer):
        conn.get("x")
        with tallying(inner):
            conn.get("x")
            conn.get("x")
        context = contextvars.copy_context()  # as Starlette hands a request's context to its thread pool
        thread = threading.Thread(target=context.run, args=(conn.get, "x"))
        thread.start()
        thread.join()
        bare = threading.Thread(target=lambda: seen.append(conn.get("x")))  # a thread of its own: no tally
        bare.start()
        bare.join()
    assert (outer.count, inner.count) == (2, 2) and len(seen) == 1
