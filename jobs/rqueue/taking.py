"""Taking jobs from rq's queues without ever holding one in no list: take, put back, wait for one, wake an idle worker,
and put back what a dead worker took but never claimed (part of the adapter over rq, ``jobs.rqueue``)."""

from __future__ import annotations

import time

from redis import Redis
from redis.client import Pipeline
from rq.job import Job, JobStatus
from rq.queue import Queue

from jobs.keys import wake_key
from jobs.rqueue.layout import SERIALIZER, restore_job
from jobs.scripts import Script

# A worker claims what it took within its batch wait: an entry of an intermediate list older
# than this is a dead worker's (rq's own clean-up waits a minute, then fails the job).
STRANDED_AFTER_SECONDS = 15.0
# The wake list keeps at most this many entries (more jobs than idle workers need no more).
WAKE_ENTRIES = 64


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# KEYS: a queue and its intermediate list, for each queue in priority order; ARGV[1]: rq's job
# key prefix, ARGV[2]: how many jobs at most, ARGV[3]: the wake list. Moves up to that many ids
# from the first queue that has one to its intermediate list, each with its job's hash (an id
# whose job is gone, expired or deleted, is dropped), and takes one wake-up per job off the
# wake list (it was pushed for that job: left there, it would wake an idle worker for
# nothing). Returns {queue number, {{id, hash}, ...}}, or nil.
TAKE = Script(
    """
local most = tonumber(ARGV[2])
for q = 1, #KEYS, 2 do
  local out = {}
  while #out < most do
    local id = redis.call('LMOVE', KEYS[q], KEYS[q + 1], 'LEFT', 'RIGHT')
    if not id then break end
    local data = redis.call('HGETALL', ARGV[1] .. id)
    if #data == 0 then
      redis.call('LREM', KEYS[q + 1], 1, id)
    else
      out[#out + 1] = {id, data}
    end
  end
  if #out > 0 then
    redis.call('LPOP', ARGV[3], #out)
    return {(q + 1) / 2, out}
  end
end
return false
"""
)


def _taken(conn: Redis, queues: list[Queue], most: int) -> tuple[Queue, list[Job]] | None:
    """Up to ``most`` jobs of the first non-empty queue of ``queues``, moved atomically (with
    their data) to that queue's intermediate list as rq's dequeue moves one: one round trip."""
    keys = [k for queue in queues for k in (queue.key, queue.intermediate_queue_key)]
    reply = TAKE(conn, keys, [Job.redis_job_namespace_prefix, most, wake_key()])
    if not reply:
        return None
    number, rows = reply
    jobs = []
    for raw_id, flat in rows:
        job = Job(_text(raw_id), connection=conn, serializer=SERIALIZER)
        restore_job(job, dict(zip(flat[::2], flat[1::2])))
        jobs.append(job)
    return queues[int(number) - 1], jobs


def take(conn: Redis, queue: Queue) -> Job | None:
    """The next job of ``queue``, moved atomically to its intermediate list as rq's dequeue
    moves one (None when the queue is empty). An id whose job is gone is dropped."""
    taken = _taken(conn, [queue], 1)
    return taken[1][0] if taken else None


def take_some(conn: Redis, queue: Queue, most: int) -> list[Job]:
    """Up to ``most`` next jobs of ``queue``, in queue order, each moved to its intermediate
    list (``take``), in one round trip."""
    taken = _taken(conn, [queue], most) if most > 0 else None
    return taken[1] if taken else []


def untake(conn: Redis, queue: Queue, job_id: str) -> None:
    """Put a job taken but not claimed back at the head of its queue, where it was."""
    untake_all(conn, queue, [job_id])


def untake_all(conn: Redis, queue: Queue, job_ids: list[str]) -> None:
    """Put jobs taken but not claimed back at the head of their queue, in their order."""
    if not job_ids:
        return
    with conn.pipeline() as pipe:
        for job_id in job_ids:
            pipe.lrem(queue.intermediate_queue_key, 1, job_id)
        pipe.lpush(queue.key, *reversed(job_ids))
        wake(pipe)
        pipe.execute()


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
