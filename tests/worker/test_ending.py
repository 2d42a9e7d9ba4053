"""A worker's batch ends written in their own thread (``worker.ending.Ender``): in the order handed, at most one batch
waiting while another is written, drained on demand, and an error of one batch leaving the later ones written."""

from __future__ import annotations

import logging
import threading
import time

from worker.ending import Ender


def test_batches_are_written_in_order_and_drain_waits_for_all():
    ender, written = Ender(), []
    for i in range(20):
        ender.hand(lambda i=i: (time.sleep(0.001), written.append(i)))
    ender.drain()
    assert written == list(range(20))
    ender.drain()  # nothing handed: at once


def test_a_third_batch_waits_in_the_loop_while_one_is_written_and_one_waits():
    ender, release, started = Ender(), threading.Event(), threading.Event()
    ender.hand(lambda: (started.set(), release.wait(30)))
    assert started.wait(30)
    ender.hand(lambda: None)  # waits behind the one being written
    third = threading.Thread(target=ender.hand, args=(lambda: None,))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # the loop is held back, not let to pile up finished work
    release.set()
    third.join(30)
    assert not third.is_alive()
    ender.drain()


def test_an_error_is_logged_without_its_message_and_later_batches_are_still_written(caplog):
    ender, written, threads = Ender(), [], set()

    def broken():
        threads.add(threading.current_thread())
        name = "Jane " + "Doe"
        raise ValueError(f"patient {name}")  # an exception's text may quote the input

    ender.hand(broken)
    ender.hand(lambda: (threads.add(threading.current_thread()), written.append("after")))
    with caplog.at_level(logging.ERROR, logger="aex.worker"):
        ender.drain()
    assert written == ["after"]
    assert "left to their leases" in caplog.text
    assert "Jane Doe" not in caplog.text
    assert len(threads) == 1 and next(iter(threads)).is_alive()  # the same thread serves on
