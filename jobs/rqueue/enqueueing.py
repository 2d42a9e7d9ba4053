"""Putting a job in its queue within its owner's share, in one round trip (part of the adapter over rq, ``jobs.rqueue``): the share's Lua script, rq's enqueue commands recorded for it.

Torch-free: the API imports it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq.job import Job
from rq.queue import Queue

from jobs.batches import BATCH_FIELD, batch_signature_of, signature_text
from jobs.queues import JOB_FUNCTIONS, QUEUE_NAMES, JobKind
from jobs.rqueue.layout import SERIALIZER, STATUS_FROM_RQ
from jobs.rqueue.taking import wake
from jobs.scripts import RUN, Script, framed, recorded
from jobs.scripts import commands as encoded
from jobs.states import ApiStatus


@functools.lru_cache(maxsize=64)
def rq_queue(conn: Redis, name: str) -> Queue:
    """rq's Queue ``name`` on ``conn``."""
    # One per connection and name: rq asks a new Queue for the server's version (INFO) at its
    # first enqueue.
    return Queue(name, connection=conn, serializer=SERIALIZER)


@dataclass(frozen=True)
class Share:
    """An owner's share of the queues: the sorted set ``key`` of the ids of its jobs that may
    still wait or run (scored by when each was reserved), at most ``limit`` of them active; the
    set lives ``ttl`` seconds after its last reservation. An id whose job is not (or no
    longer) in Redis counts while it is younger than ``reservation_seconds``."""

    key: str
    limit: int
    ttl: int
    reservation_seconds: float


# The rq statuses of a job that waits or runs (its owner's share counts it).
ACTIVE_STATUSES = tuple(s.value for s, api in STATUS_FROM_RQ.items() if api in (ApiStatus.QUEUED, ApiStatus.RUNNING))

# KEYS[1]: the share's set, KEYS[2] (when enqueueing): the new job's hash (there already: this
# very step was done, its reply lost and the command sent again; nothing is done twice); ARGV:
# the new id, now (s), limit, ttl, reservation seconds, rq's job key prefix, the active
# statuses (framed), the conditions the step is written under (framed triples, ``Condition``),
# the commands to run first whatever the share says (framed: the request's pending audit
# record), then those to run once the id holds a place (framed). When a condition no longer
# holds nothing at all is written (returns -1). Ids of jobs that ended or expired leave the set;
# when the active others reach the limit nothing more is written (returns 0), else the id takes
# its place and the commands run (returns 1): a place and its job appear together, so two
# requests racing for the last place cannot both get it.
WITHIN_SHARE = Script(
    RUN
    + """
if #KEYS > 1 and redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
local id, now, limit, ttl, reservation, prefix = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4],
  tonumber(ARGV[5]), ARGV[6]
local active, a = {}, 8 + tonumber(ARGV[7])
for i = 8, a - 1 do active[ARGV[i]] = true end
for i = a + 1, a + tonumber(ARGV[a]), 3 do
  local op, key, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if (op == 'NIL' and redis.call('EXISTS', key) == 1) or (op == 'EQ' and redis.call('GET', key) ~= value)
    or (op == 'LT' and redis.call('LLEN', key) >= tonumber(value)) then return -1 end
end
a = a + tonumber(ARGV[a]) + 1
run(ARGV, a + 1, a + tonumber(ARGV[a]))
a = a + tonumber(ARGV[a]) + 1
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local count, ended = 0, {}
for i = 1, #entries, 2 do
  local other = entries[i]
  if other ~= id then
    local status = redis.call('HGET', prefix .. other, 'status')
    if (status and active[status]) or (not status and now - tonumber(entries[i + 1]) < reservation) then
      count = count + 1
    else
      ended[#ended + 1] = other
    end
  end
end
if #ended > 0 then redis.call('ZREM', KEYS[1], unpack(ended)) end
if count >= limit then return 0 end
redis.call('ZADD', KEYS[1], now, id)
redis.call('EXPIRE', KEYS[1], ttl)
run(ARGV, a + 1, a + tonumber(ARGV[a]))
return 1
"""
)
# KEYS[1]: the new job's hash (there already: done once, nothing is done twice); ARGV: the commands (framed).
ENQUEUE_ONCE = Script(
    RUN + "if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end\nrun(ARGV, 2, 1 + tonumber(ARGV[1]))\nreturn 1"
)


# A condition an enqueue is written under, checked by its script before anything is written
# (``enqueue(..., conditions=...)``): ("NIL", key, "") the key is absent, ("EQ", key, value) it
# holds ``value``, ("LT", key, n) the list at ``key`` is shorter than n.
Condition = tuple[str, str, str]


def absent(key: str) -> Condition:
    return ("NIL", key, "")


def holding(key: str, value: str) -> Condition:
    return ("EQ", key, value)


def shorter_than(key: str, length: int) -> Condition:
    return ("LT", key, str(int(length)))


class Moved(Exception):
    """A condition an enqueue was to be written under no longer held: nothing was written."""


def within_share(
    conn: Redis,
    share: Share,
    job_id: str,
    commands: list[bytes],
    lead: list[bytes] | None = None,
    once: bool = False,
    conditions: list[Condition] | None = None,
) -> bool:
    """Reserve ``job_id`` a place in ``share`` and run ``commands`` (``jobs.scripts``) with it,
    in one step, ``lead`` first whatever the share says; False (nothing but ``lead``
    written) when the share is full. ``once`` (the commands create the job): nothing is done
    when the job exists already (the same step sent again after its reply was lost).
    ``conditions``: ``Moved`` (nothing written, ``lead`` neither) when one does not hold."""
    args = [job_id, time.time(), share.limit, max(1, int(share.ttl)), share.reservation_seconds]
    args += [Job.redis_job_namespace_prefix, *framed(list(ACTIVE_STATUSES))]
    args += [*framed([part for condition in conditions or () for part in condition]), *framed(lead or [])]
    keys = [share.key, Job.key_for(job_id)] if once else [share.key]
    placed = int(WITHIN_SHARE(conn, keys, [*args, *framed(commands)]))
    if placed < 0:
        raise Moved(job_id)
    return bool(placed)


def enqueue(
    conn: Redis,
    lane: JobKind,
    kind: JobKind,
    job_id: str,
    kwargs: dict[str, Any],
    meta: dict[str, Any],
    timeout: int,
    result_ttl: int,
    wait_ttl: int,
    description: str,
    *,
    share: Share | None = None,
    also: list[list[Any]] | None = None,
    lead: list[list[Any]] | None = None,
    conditions: list[Condition] | None = None,
) -> bool:
    """Put job ``job_id`` of ``kind`` (its function by dotted path) at the tail of the queue
    of ``lane``, and wake an idle worker; it waits at most ``wait_ttl`` seconds, runs at most
    ``timeout``, and its result (or failure) is kept ``result_ttl``. ``also``: commands written
    with it (its upload); ``lead``: commands written before anything else, whatever happens
    (the request's pending audit record). With ``share``, only within its owner's share:
    False, and nothing but ``lead`` written, when it is full. ``conditions`` (with ``share``):
    what the step is written under, checked first (``Moved``, nothing written, when one does
    not hold). One round trip."""

    batch = signature_text(batch_signature_of(JOB_FUNCTIONS[kind], kwargs, meta))

    def write(pipe: Pipeline) -> None:
        for command in also or ():
            pipe.execute_command(*command)
        rq_queue(conn, QUEUE_NAMES[lane]).enqueue(
            JOB_FUNCTIONS[kind],
            kwargs=kwargs,
            job_id=job_id,
            job_timeout=timeout,
            result_ttl=result_ttl,
            failure_ttl=result_ttl,
            ttl=wait_ttl,
            meta=meta,
            description=description,
            pipeline=pipe,
        )
        if batch is not None:  # a worker takes the jobs that share a batch in one step (claiming.claim_next)
            pipe.hset(Job.key_for(job_id), BATCH_FIELD, batch)
        wake(pipe)  # an idle worker takes it now, not at its next look

    first = encoded(conn, lead or [])
    written = recorded(conn, write)
    if share is not None:
        return within_share(conn, share, job_id, written, lead=first, once=True, conditions=conditions)
    if conditions:
        raise ValueError("conditions are checked with an owner's share only")
    ENQUEUE_ONCE(conn, [Job.key_for(job_id)], framed([*first, *written]))
    return True
