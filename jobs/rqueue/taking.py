"""Taking jobs from rq's queues without ever holding one in no list: take, put back, wait for one, wake an idle worker,
and put back what a dead worker took but never claimed (part of the adapter over rq, ``jobs.rqueue``)."""

from __future__ import annotations

import time

from redis import Redis
from redis.client import Pipeline
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue

from jobs.keys import wake_key
from jobs.rqueue.layout import SERIALIZER

# A worker claims what it took within its batch wait: an entry of an intermediate list older
# than this is a dead worker's (rq's own clean-up waits a minute, then fails the job).
STRANDED_AFTER_SECONDS = 15.0
# The wake list keeps at most this many entries (more jobs than idle workers need no more).
WAKE_ENTRIES = 64


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def take(conn: Redis, queue: Queue) -> Job | None:
    """The next job of ``queue``, moved atomically to its intermediate list as rq's dequeue
    moves one (None when the queue is empty). An id whose job is gone is dropped."""
    while True:
        raw = conn.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")
        if raw is None:
            return None
        job = _fetch_taken(conn, queue, _text(raw))
        if job is not None:
            return job


def _fetch_taken(conn: Redis, queue: Queue, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
    except NoSuchJobError:
        conn.lrem(queue.intermediate_queue_key, 1, job_id)  # expired or deleted meanwhile
        return None


def untake(conn: Redis, queue: Queue, job_id: str) -> None:
    """Put a job taken but not claimed back at the head of its queue, where it was."""
    with conn.pipeline() as pipe:
        pipe.lrem(queue.intermediate_queue_key, 1, job_id)
        pipe.lpush(queue.key, job_id)
        wake(pipe)
        pipe.execute()


def take_any(conn: Redis, queues: list[Queue], wait_seconds: float) -> tuple[Job, Queue] | None:
    """The next job of the first non-empty queue of ``queues`` (priority order), moved
    atomically to that queue's intermediate list, waiting at most ``wait_seconds`` for one
    (None then). rq's own dequeue pops from several queues with BLPOP, which leaves nothing
    behind: a worker killed between that pop and the claim would lose the job. Here a job is
    always in a list, so a dead worker's jobs are found (``requeue_stranded``). Waiting blocks
    on the wake list (``wake``: an entry with every job put in a queue), then looks at every
    queue again; a wake-up that finds nothing (another worker was faster) costs one look."""
    deadline = time.monotonic() + max(0.0, wait_seconds)
    while True:
        for queue in queues:
            job = take(conn, queue)
            if job is not None:
                return job, queue
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        conn.blpop([wake_key()], timeout=max(0.01, left))


def wake(pipe: Redis | Pipeline) -> None:
    """Wake an idle worker: a job was put in a queue (bounded: a wake-up only makes a worker look)."""
    pipe.rpush(wake_key(), 1)
    pipe.ltrim(wake_key(), -WAKE_ENTRIES, -1)


def requeue_stranded(conn: Redis, queue: Queue, older_than: float = STRANDED_AFTER_SECONDS) -> list[str]:
    """Put back at the head of ``queue`` the jobs left in its intermediate list by a worker
    that died between taking and claiming them (a worker claims what it took within its
    batch wait, so an entry seen there longer than ``older_than`` seconds is a dead worker's).
    A job that never started loses nothing by waiting again. Returns the ids put back."""
    inter = queue.intermediate_queue
    moved = []
    for job_id in inter.get_job_ids():
        seen = conn.get(inter.get_first_seen_key(job_id))
        if seen is None:
            conn.set(inter.get_first_seen_key(job_id), time.time(), nx=True, ex=3600)
            continue
        if time.time() - float(seen) < older_than:
            continue
        conn.delete(inter.get_first_seen_key(job_id))
        if not conn.lrem(inter.key, 1, job_id):
            continue  # claimed meanwhile
        if _text(conn.hget(Job.key_for(job_id), "status")) == JobStatus.QUEUED.value:
            # A claim racing this push finds the job started and skips the duplicate.
            conn.lpush(queue.key, job_id)
            wake(conn)
            moved.append(job_id)
    return moved
