"""A worker's batch ends written in a thread of their own, one batch after another, while its main thread takes and computes the next batch.

Writing a batch's ends (building each job's fenced commands: rq's records, the result, the
index, the count; one round trip that waits for Redis's fsync; then the callbacks) is Python
and waiting, not the model: about 12% of a worker's wall-clock time at 8 clients (py-spy). Done in
the work loop, it kept the next batch waiting although a core was free. Here the loop hands
each batch's ends over (``hand``) and goes on; the jobs of the batch stay leased until their
ends are written (``Attempt``'s lease: the worker's lease thread renews every attempt held),
so a worker that dies with ends not yet written leaves those jobs to the same retries as a
worker that dies mid-job.

- **in order, one batch at a time**: a single thread, so ends reach Redis in the order the
  jobs ran;
- **bounded**: one batch waits at most while another is written; a third waits in the work
  loop (``hand`` blocks), so a slow or absent store holds the worker back instead of letting
  finished work pile up in memory;
- **drained** before the worker stops (``drain``: a warm shutdown, the end of a burst), and
  before an end is written in the work loop itself (``drain`` then the write: a batch cut
  short by a cold shutdown);
- an unexpected error of a hand-over is logged (its redacted traceback) and its jobs are left
  to their leases; it does not stop the thread, which serves every later batch.
"""

from __future__ import annotations

import functools
import logging
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from jobs.failures import redacted_traceback
from jobs.rqueue import lifecycle
from jobs.rqueue.lifecycle import Attempt

log = logging.getLogger("aex.worker")


@dataclass
class Ending:
    """A job's end to be written: ``make()`` builds it (``lifecycle.End``; in the thread that
    writes it, not in the work loop), with what follows it once written (``then``: the
    callback) or once refused (``refused``: its attempt was fenced out)."""

    attempt: Attempt
    make: Callable[[], lifecycle.End]
    what: str  # "its result", for the logs
    then: Callable[[], None] = lambda: None
    refused: Callable[[], None] = lambda: None

    @functools.cached_property
    def end(self) -> lifecycle.End:
        return self.make()


class Ender:
    """See the module docstring. ``name``: the thread's."""

    def __init__(self, name: str = "aex-job-ends"):
        self.name = name
        # One batch waiting at most while another is written (``hand`` blocks on a third).
        self._waiting: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def hand(self, write: Callable[[], None]) -> None:
        """Have ``write()`` (a batch's ends, and what follows them) run in the thread, after
        every batch handed before it; blocks while another batch already waits."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, daemon=True, name=self.name)
                self._thread.start()
        self._waiting.put(write)

    def drain(self) -> None:
        """Return once every batch handed over has been written (at once when none is)."""
        self._waiting.join()

    def _serve(self) -> None:
        while True:
            write = self._waiting.get()
            try:
                write()
            except Exception:
                log.error(
                    "the ends of a batch could not be written; its jobs are left to their leases:\n%s",
                    redacted_traceback(*sys.exc_info()),
                )
            finally:
                self._waiting.task_done()
