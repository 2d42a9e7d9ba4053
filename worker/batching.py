"""Dynamic batching on top of rq: which queued jobs may share one computation, and taking them.

rq hands a worker one job at a time. A worker that has just taken a job (the leader) takes up
to ``AEX_MAX_BATCH - 1`` more from the same queue (its batch mates), waiting at most
``AEX_BATCH_WAIT_MS`` after the leader for more to arrive, as Triton's dynamic batcher
and Ray Serve's ``@serve.batch`` do. Jobs share a batch when their
``batch_signature`` is equal: the same job function and model and the same search settings
(so their rows can run as one forward pass or one search): classify jobs, and explain jobs.
Each job keeps its own life: it is taken as rq's own dequeue takes one
(``jobs.rqueue.taking.take_some``), claimed with its own attempt
token and lease (visibly running from then on), then run, timed out, cancelled, retried and
ended one by one by the worker (``worker.process``); only the computation is shared, done
before the jobs run and handed to each job function (``worker.context``). A job
whose own part of the work failed (its file, say) fails alone; the batch's failure as a whole
(out of memory, its time limit) leaves every job to compute on its own.

Torch-free: what is computed lives in ``worker.compute``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis import Redis

from jobs.batches import batch_signature_of
from jobs.rqueue.taking import take_some, untake_all

if TYPE_CHECKING:
    from rq.job import Job
    from rq.queue import Queue

# How often an empty queue is looked at again while a batch waits for mates.
POLL_SECONDS = 0.0005


def batch_signature(job: Job) -> tuple | None:
    """What must be equal for two jobs to share a batch (``jobs.batches.batch_signature_of``),
    from the job's own data; None for a job that always runs alone, and for any job whose data
    cannot be read."""
    try:
        name, kwargs, meta = job.func_name, job.kwargs, job.meta
    except Exception:
        return None
    return batch_signature_of(name, kwargs, meta)


def fitting(leader: Job, taken: list[Job], max_batch: int) -> int:
    """How many of ``taken`` (the jobs taken behind the leader, in queue order) share its
    batch: the longest prefix of them with its signature, ``max_batch - 1`` at most (none for
    a leader that runs alone)."""
    signature = batch_signature(leader)
    if signature is None or max_batch <= 1:
        return 0
    n = 0
    while n < min(len(taken), max_batch - 1) and batch_signature(taken[n]) == signature:
        n += 1
    return n


def gather_mates(
    conn: Redis,
    queue: Queue,
    leader: Job,
    room: int,
    wait_seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Job]:
    """Up to ``room`` more jobs of ``queue`` with the leader's signature, taken in queue
    order (as many as wait at each look, in one round trip), waiting at most ``wait_seconds``
    (from now) for more to arrive. The first job that does not fit (another model, a job that
    runs alone) is put back at the head of the queue with every job taken after it, and ends
    the gathering, so the queue's order is kept."""
    signature = batch_signature(leader)
    if signature is None or room <= 0:
        return []
    mates: list[Job] = []
    deadline = clock() + max(0.0, wait_seconds)
    while len(mates) < room:
        taken = take_some(conn, queue, room - len(mates))
        fit = fitting(leader, taken, len(taken) + 1)
        mates += taken[:fit]
        if fit < len(taken):
            untake_all(conn, queue, [j.id for j in taken[fit:]])
            break
        if taken:
            continue
        left = deadline - clock()
        if left <= 0:
            break
        # Polled, not BLMOVE: Redis checks a blocked client's timeout in its cron, 10 times
        # a second, so a 2 ms BLMOVE would hold the batch for up to 100 ms.
        sleep(min(left, POLL_SECONDS))
    return mates
