"""The fenced life of a job attempt in Redis (the worker side of the rq adapter): claim, lease, end, requeue.

Every change of a job's state that a retry, a late worker or a second reaper could repeat is a
compare-and-set on the job's hash (WATCH, check, MULTI ... EXEC):

- ``claim``: queued -> started by one worker, with a new **attempt token** (``ATTEMPT_FIELD``,
  incremented) and its own lease (an rq execution in the queue's started registry, whose score
  is when the lease runs out). A job that is no longer queued (taken twice after a duplicated
  push, cancelled, ended) is not claimed: it runs at most once at a time.
- ``renew``: the lease of an attempt is extended only while that attempt still holds the job.
- ``finish`` / ``fail`` / ``requeue``: written only while the job is ``started`` under the
  caller's token; the token that ended the job is kept (``ENDED_FIELD``), so an end written
  once whose reply was lost (Redis restarted) is recognised as done, never written twice.
- reaping (``jobs.rqueue.reaping``): a started job whose every lease ran out is queued again
  or failed, its token incremented in the same transaction (fencing the old worker out).

What happens once a job has ended for good (its upload deleted, its quota freed, its result
indexed, its outcome counted) is written in the same transaction as the end, so it happens
exactly when the job ends and only once; the callback follows the transaction, by whoever's
transaction ended the job.

The claim and the ends are Lua scripts (``jobs.scripts``: rq's commands, run where the
check holds), one round trip for a whole batch of jobs (``claim_all``, ``write_ends``); the
reaper, rare, keeps WATCH and MULTI/EXEC.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.utils import now, utcformat

from jobs.keys import cancel_key, upload_key
from jobs.rqueue.taking import wake
from jobs.scripts import RUN, Script, framed, recorded

log = logging.getLogger("aex.jobs")

ATTEMPT_FIELD = "aex_attempt"  # the fencing token: +1 at every claim and every reap
ENDED_FIELD = "aex_ended_attempt"  # the token under which the job ended
REAPED = -2  # ENDED_FIELD of a job the reaper ended
FAILURE_TTL_SECONDS = 3600  # a failure kept this long when its job names no failure TTL (aex's always do)


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Attempt:
    """One run of a job by one worker: the job, the token that fences its writes, its lease."""

    job: Job
    queue: Queue
    token: int
    execution: Execution
    lost: bool = field(default=False)  # fenced out (reaped, or Redis lost the job): stop, write nothing
    cancel_seen: bool = field(default=False)  # its cancel flag was set when it was claimed
    upload: bytes | None = field(default=None, repr=False)  # its upload (sealed) as it was when claimed


def _compare_and_set(
    conn: Redis, job_key: str, check: Callable[[str | None, int, int], bool], write: Callable[[Pipeline, int], None]
) -> bool:
    """WATCH ``job_key``, read (status, attempt, ended attempt), and when ``check`` holds, run
    ``write(pipe, attempt)`` in MULTI/EXEC. True when written; False when the check failed."""
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(job_key)
                status, attempt, ended = pipe.hmget(job_key, "status", ATTEMPT_FIELD, ENDED_FIELD)
                attempt_no, ended_no = int(attempt or 0), int(ended or -1)
                if not check(_text(status), attempt_no, ended_no):
                    pipe.reset()
                    return False
                pipe.multi()
                write(pipe, attempt_no)
                pipe.execute()
                return True
            except WatchError:
                continue


# --- claiming and leasing ----------------------------------------------------------------
# KEYS: the jobs' hashes; ARGV per job: its queue's intermediate list, its id, the key of the
# new execution, its cancel flag's key, its upload's key, then rq's commands that start it
# (framed). A queued job gets the next attempt token and those commands; a started one whose
# execution is this claim's (the reply of a first send was lost) keeps its token; any other is
# not claimed. Each leaves the intermediate list. Returns {token or 0, cancel flag set, the
# upload} per job (the upload only with a token: the job's input, read in the same step).
CLAIM = Script(
    RUN
    + f"""
local out = {{}}
local a = 1
for i = 1, #KEYS do
  local inter, id, execution, cancel, upload = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local first, last = a + 6, a + 5 + tonumber(ARGV[a + 5])
  a = last + 1
  local status = redis.call('HGET', KEYS[i], 'status')
  local token = 0
  if status == '{JobStatus.QUEUED.value}' then
    token = redis.call('HINCRBY', KEYS[i], '{ATTEMPT_FIELD}', 1)
    run(ARGV, first, last)
  elseif status == '{JobStatus.STARTED.value}' and redis.call('EXISTS', execution) == 1 then
    token = tonumber(redis.call('HGET', KEYS[i], '{ATTEMPT_FIELD}'))
  end
  redis.call('LREM', inter, 1, id)
  out[i] = {{token, redis.call('EXISTS', cancel), token ~= 0 and redis.call('GET', upload)}}
end
return out
"""
)


def claim(conn: Redis, job: Job, queue: Queue, worker_name: str, lease_seconds: int) -> Attempt | None:
    """Start ``job`` (taken from ``queue`` into its intermediate list) under a new attempt
    token and a lease of ``lease_seconds``; None when it is no longer queued (it leaves the
    intermediate list either way)."""
    return claim_all(conn, [job], queue, worker_name, lease_seconds)[0]


def claim_all(conn: Redis, jobs: list[Job], queue: Queue, worker_name: str, lease_seconds: int) -> list[Attempt | None]:
    """``claim`` of each job of ``jobs`` (all taken from ``queue``), in one round trip."""
    if not jobs:
        return []
    executions: list[Execution] = []
    args: list[bytes | str | int] = []
    for job in jobs:

        def start(pipe: Pipeline, job: Job = job) -> None:
            job.prepare_for_execution(worker_name, pipe)  # status started, started_at, worker_name
            executions.append(Execution.create(job, lease_seconds, pipeline=pipe, worker_name=worker_name))
            pipe.persist(job.key)

        written = recorded(conn, start)
        keys = [queue.intermediate_queue_key, job.id, executions[-1].key, cancel_key(job.id), upload_key(job.id)]
        args += [*keys, *framed(written)]
    replies = CLAIM(conn, [job.key for job in jobs], args)
    return [
        Attempt(job, queue, int(token), execution, cancel_seen=bool(cancelled), upload=upload or None)
        if int(token)
        else None
        for job, execution, (token, cancelled, upload) in zip(jobs, executions, replies)
    ]


def holds(conn: Redis, attempt: Attempt) -> bool:
    """Whether ``attempt`` still holds its job (started, under its token)."""
    status, token = conn.hmget(attempt.job.key, "status", ATTEMPT_FIELD)
    return _text(status) == JobStatus.STARTED.value and int(token or 0) == attempt.token


def renew(conn: Redis, attempt: Attempt, lease_seconds: int) -> bool:
    """Extend the lease of ``attempt`` while it holds its job; False (and ``attempt.lost``)
    once it does not. A renewal racing a reap can only touch an entry that is still there
    (ZADD XX), so it never brings back a lease the reaper removed."""
    if not holds(conn, attempt):
        attempt.lost = True
        return False
    with conn.pipeline() as pipe:
        attempt.execution.heartbeat(attempt.job.started_job_registry, lease_seconds, pipeline=pipe)
        attempt.job.heartbeat(now(), lease_seconds, pipeline=pipe)
        pipe.execute()
    return True


# --- ending --------------------------------------------------------------------------------
def discard_partial(conn: Redis, job: Job) -> None:
    """Delete what a fenced-out attempt may have recreated of a job Redis lost (a restart
    without persistence: its progress writes make a hash with no job data, which no reader
    could use; the API answers ``job_lost`` for its id)."""
    if not conn.hexists(job.key, "data"):
        conn.delete(job.key)


def _save_meta(pipe: Pipeline, job: Job) -> None:
    pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))


def _ours(attempt: Attempt) -> Callable[[str | None, int, int], bool]:
    return lambda status, token, _ended: status == JobStatus.STARTED.value and token == attempt.token


def _end_common(pipe: Pipeline, attempt: Attempt, status: JobStatus) -> None:
    job = attempt.job
    job.ended_at = now()
    job.set_status(status, pipeline=pipe)
    pipe.hset(job.key, mapping={"ended_at": utcformat(job.ended_at), ENDED_FIELD: attempt.token})
    _save_meta(pipe, job)
    attempt.execution.delete(job=job, pipeline=pipe)
    pipe.delete(upload_key(job.id))  # its final end: nothing will read the input again


def ended_by(conn: Redis, attempt: Attempt) -> bool:
    """Whether the job ended under ``attempt``'s token (an end whose reply was lost)."""
    return int(conn.hget(attempt.job.key, ENDED_FIELD) or -1) == attempt.token


@dataclass(frozen=True)
class End:
    """A write fenced by ``attempt``'s token: its commands (``jobs.scripts``), and whether
    it ends the job (an end written once is recognised when sent again; a requeue is not an end)."""

    attempt: Attempt
    commands: list[bytes]
    final: bool = True
    # A key whose presence refuses this end when it is written (the job's cancel flag, for a
    # result: a job cancelled while it ran ends cancelled, not finished): nothing is written.
    unless: str | None = None


# KEYS: the jobs' hashes; ARGV per job: the attempt's token, "1" for an end, its ``unless``
# key ("" for none), its commands (framed). Each job's commands run only while it is started
# under that token, and its ``unless`` key is absent. Returns per job 1 (written), 2 (an end
# this token had written already), 3 (its ``unless`` key was there: nothing written) or 0
# (refused: fenced out).
ENDS = Script(
    RUN
    + f"""
local out = {{}}
local a = 1
for i = 1, #KEYS do
  local token, final, unless = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local first, last = a + 4, a + 3 + tonumber(ARGV[a + 3])
  a = last + 1
  local status = redis.call('HGET', KEYS[i], 'status')
  if status == '{JobStatus.STARTED.value}' and redis.call('HGET', KEYS[i], '{ATTEMPT_FIELD}') == token then
    if unless ~= '' and redis.call('EXISTS', unless) == 1 then
      out[i] = 3
    else
      run(ARGV, first, last)
      out[i] = 1
    end
  elseif final == '1' and redis.call('HGET', KEYS[i], '{ENDED_FIELD}') == token then
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
"""
)


def write_ends(conn: Redis, ends: list[End]) -> list[bool | None]:
    """Write every fenced write of ``ends`` (of several jobs) in one round trip; per end,
    whether it holds (written now, or an end written before under the same token), or None
    when its ``unless`` key was there (nothing written; its attempt still holds the job)."""
    if not ends:
        return []
    args: list[bytes | str | int] = []
    for end in ends:
        args += [end.attempt.token, "1" if end.final else "0", end.unless or "", *framed(end.commands)]
    replies = ENDS(conn, [end.attempt.job.key for end in ends], args)
    return [None if int(r) == 3 else int(r) > 0 for r in replies]


Also = Callable[[Pipeline], None] | None


def finishing(
    conn: Redis, attempt: Attempt, result: Any, result_ttl: int, also: Also = None, unless: str | None = None
) -> End:
    """The end of ``attempt`` as finished with ``result``, with ``also(pipe)`` (the result's
    index, the outcome count) in the same transaction; not written when the key ``unless``
    exists then (``End.unless``)."""
    job = attempt.job

    def write(pipe: Pipeline) -> None:
        _end_common(pipe, attempt, JobStatus.FINISHED)
        Result.create(job, Result.Type.SUCCESSFUL, result_ttl, return_value=result, pipeline=pipe)
        job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
        job.finished_job_registry.add(job, result_ttl, pipe)
        if also is not None:
            also(pipe)

    return End(attempt, recorded(conn, write), unless=unless)


def failing(
    conn: Redis, attempt: Attempt, error: dict[str, str], trace: str, stopped: bool = False, also: Also = None
) -> End:
    """The end of ``attempt`` as failed (or, ``stopped``, cancelled while it ran) with
    ``error`` ({"code", "message"}) in its meta and ``trace`` (redacted) as rq's failure."""
    job = attempt.job

    def write(pipe: Pipeline) -> None:
        job.meta["error"] = error
        _end_common(pipe, attempt, JobStatus.STOPPED if stopped else JobStatus.FAILED)
        _record_failure(pipe, job, trace)
        if also is not None:
            also(pipe)

    return End(attempt, recorded(conn, write))


def requeueing(conn: Redis, attempt: Attempt, also: Also = None) -> End:
    """The job of ``attempt`` queued again at the front of its queue (a run cut short, retries left)."""
    job = attempt.job

    def write(pipe: Pipeline) -> None:
        _back_in_queue(pipe, job, attempt.queue)
        attempt.execution.delete(job=job, pipeline=pipe)
        pipe.hset(job.key, ATTEMPT_FIELD, attempt.token + 1)
        if also is not None:
            also(pipe)

    return End(attempt, recorded(conn, write), final=False)


def finish(conn: Redis, attempt: Attempt, result: Any, result_ttl: int, also: Also = None) -> bool:
    """Record ``result`` as the job's end (finished), with ``also(pipe)`` in the same
    transaction (the result's index); False when the attempt no longer holds the job."""
    return write_ends(conn, [finishing(conn, attempt, result, result_ttl, also)])[0]


def fail(conn: Redis, attempt: Attempt, error: dict[str, str], trace: str, stopped: bool = False) -> bool:
    """Record the job's end as failed (or, ``stopped``, cancelled while it ran) with
    ``error`` ({"code", "message"}) in its meta and ``trace`` (redacted) as rq's failure."""
    return write_ends(conn, [failing(conn, attempt, error, trace, stopped)])[0]


def _record_failure(pipe: Pipeline, job: Job, trace: str) -> None:
    ttl = int(job.failure_ttl or FAILURE_TTL_SECONDS)
    job.failed_job_registry.add(job, ttl=ttl, exc_string=trace, pipeline=pipe)
    Result.create_failure(job, ttl, exc_string=trace, pipeline=pipe)
    pipe.expire(job.key, ttl)


def requeue(conn: Redis, attempt: Attempt) -> bool:
    """Queue the job again at the front of its queue (a run cut short, retries left)."""
    return write_ends(conn, [requeueing(conn, attempt)])[0]


def _back_in_queue(pipe: Pipeline, job: Job, queue: Queue) -> None:
    job.meta["retried"] = int(job.meta.get("retried") or 0) + 1
    job.meta.pop("progress", None)  # the view would show the cut run's progress while queued
    job.meta.pop("error", None)
    _save_meta(pipe, job)
    job.set_status(JobStatus.QUEUED, pipeline=pipe)
    pipe.hdel(job.key, "started_at", "worker_name")
    pipe.lpush(queue.key, job.id)
    wake(pipe)
