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
from uuid import uuid4

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.utils import now, utcformat

from jobs.batches import BATCH_FIELD
from jobs.keys import cancel_key, claim_record_key, upload_key, wake_key
from jobs.rqueue.layout import SERIALIZER
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


# Stand-ins in the claim commands recorded once per take (``claim_next``): the script puts
# each claimed job's id and its queue's name in their place, and the execution id recorded
# gives way to each job's own (letters and digits only: nothing special to Lua's gsub).
JOB_STAND_IN = "aexclaimedjob0"
QUEUE_STAND_IN = "aexclaimedqueue0"
# How long a take's record (``claim_record_key``) is kept: a take sent again after its reply
# was lost returns what the first one claimed, and claims nothing more.
CLAIM_RECORD_SECONDS = 60

# KEYS: the queues, in priority order. ARGV: [1] rq's job key prefix, [2] how many jobs at
# most, [3] the wake list, [4] this take's record, [5] its TTL (s), [6] the batch field,
# [7] the cancel flag, [8] the upload and [9] rq's execution key prefixes, [10] the job,
# [11] the queue and [12] the execution stand-ins, [13] how many wake-ups the caller took
# off the wake list itself (blocking on it), then the queues' names (framed), the
# execution ids (framed: one per job at most), rq's commands that start a job (framed, with
# the stand-ins). From the first queue with a queued job at its head: that job (the leader)
# and, while the jobs behind it carry the leader's batch signature (one without any runs
# alone), those too, each claimed as ``CLAIM`` claims one (the next attempt token, then the
# commands), then popped from the queue: a job is in its queue until it is claimed, so no
# worker ever holds a job that is in no list. An id whose job is gone or no longer queued (a
# duplicated push, a cancel) is dropped. One wake-up per job claimed (less those the caller
# took) is taken off the wake list. The take is recorded: sent again (its reply lost), it
# claims nothing more and returns those of its jobs still started under their execution.
# Returns {queue number, {{id, token (0: not held), cancel flag set, upload, hash}, ...},
# whether a job still waits in a queue}, or false when no queue has a queued job.
CLAIM_NEXT = Script(
    """
local prefix, most, wake, record, record_ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local batch_field, cancel, upload, execution_prefix = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local job_in, queue_in, execution_in, woken = ARGV[10], ARGV[11], ARGV[12], tonumber(ARGV[13])
local a = 14
local names = {}
for i = 1, tonumber(ARGV[a]) do names[i] = ARGV[a + i] end
a = a + tonumber(ARGV[a]) + 1
local executions = {}
for i = 1, tonumber(ARGV[a]) do executions[i] = ARGV[a + i] end
a = a + tonumber(ARGV[a]) + 1
local first, last = a + 1, a + tonumber(ARGV[a])

local function waiting()
  for q = 1, #KEYS do
    if redis.call('LLEN', KEYS[q]) > 0 then return 1 end
  end
  return 0
end

local function row(id, token)
  local data = false
  if token ~= 0 then data = redis.call('GET', upload .. id) end
  return {id, token, redis.call('EXISTS', cancel .. id), data, redis.call('HGETALL', prefix .. id)}
end

if redis.call('EXISTS', record) == 1 then
  local taken = redis.call('LRANGE', record, 0, -1)
  local out = {}
  for i = 2, #taken do
    local id, token = taken[i], 0
    if redis.call('HGET', prefix .. id, 'status') == 'STARTED'
        and redis.call('EXISTS', execution_prefix .. id .. ':' .. executions[i - 1]) == 1 then
      token = tonumber(redis.call('HGET', prefix .. id, 'ATTEMPT'))
    end
    out[#out + 1] = row(id, token)
  end
  return {tonumber(taken[1]), out, waiting()}
end

local function claim(id, queue, execution)
  local token = redis.call('HINCRBY', prefix .. id, 'ATTEMPT', 1)
  local i = first
  while i <= last do
    local n = tonumber(ARGV[i])
    local command = {}
    for k = 1, n do
      command[k] = (ARGV[i + k]:gsub(job_in, id):gsub(queue_in, queue):gsub(execution_in, execution))
    end
    redis.call(unpack(command))
    i = i + n + 1
  end
  return token
end

for q = 1, #KEYS do
  local out, ids, signature = {}, {}, false
  while #out < most do
    local id = redis.call('LINDEX', KEYS[q], 0)
    if not id then break end
    local fields = redis.call('HMGET', prefix .. id, 'status', batch_field)
    if fields[1] ~= 'QUEUED' then
      redis.call('LPOP', KEYS[q])
    elseif #out > 0 and (not signature or fields[2] ~= signature) then
      break
    else
      local token = claim(id, names[q], executions[#out + 1])
      redis.call('LPOP', KEYS[q])
      out[#out + 1] = row(id, token)
      ids[#ids + 1] = id
      if #out == 1 then signature = fields[2] end
    end
  end
  if #out > 0 then
    if #out > woken then redis.call('LPOP', wake, #out - woken) end
    redis.call('RPUSH', record, q, unpack(ids))
    redis.call('EXPIRE', record, record_ttl)
    return {q, out, waiting()}
  end
end
return false
""".replace("STARTED", JobStatus.STARTED.value)
    .replace("QUEUED", JobStatus.QUEUED.value)
    .replace("ATTEMPT", ATTEMPT_FIELD)
)


def _execution_prefix(conn: Redis) -> str:
    """rq's key prefix of an execution (``<prefix><job id>:<execution id>``)."""
    return Execution("e", "j", conn).key[: -len("j:e")]


def execution_ids_for(take_id: str, most: int) -> list[str]:
    """The ids of the executions a take may create, one per job (unique as the take's own id
    is: rq's are 32 hex digits, and so are these)."""
    return [f"{take_id[:29]}{i:03x}" for i in range(most)]


@dataclass(frozen=True)
class Taken:
    """What one take claimed: the queue, the attempts (the leader first; empty when a take
    sent again finds none of its jobs still held), and whether a job still waits in a queue
    (look again before blocking on the wake list)."""

    queue: Queue
    attempts: list[Attempt]
    more: bool


def claim_next(
    conn: Redis,
    queues: list[Queue],
    worker_name: str,
    lease_seconds: int,
    most: int = 1,
    take_id: str | None = None,
    execution_ids: list[str] | None = None,
    woken: int = 0,
) -> Taken | None:
    """Take and claim, in one round trip, the next queued job of the first of ``queues``
    (priority order) that has one, with the jobs behind it that share its batch (``most`` in
    all at most; ``jobs.batches``), each under its own attempt token and lease of
    ``lease_seconds`` (``claim``); None when no queue has one. ``take_id`` and
    ``execution_ids`` (``most`` of them; new ones when not given) name this take: the same
    take sent again (its reply lost) returns what it claimed the first time, no more.
    ``woken``: wake-ups the caller took off the wake list before this take (one per job
    claimed is taken off, these counted)."""
    most = max(1, most)
    take_id = take_id or uuid4().hex
    execution_ids = execution_ids or execution_ids_for(take_id, most)
    stand_in = Job(JOB_STAND_IN, connection=conn, serializer=SERIALIZER)
    stand_in.origin = QUEUE_STAND_IN
    recorded_executions: list[Execution] = []

    def start(pipe: Pipeline) -> None:
        stand_in.prepare_for_execution(worker_name, pipe)  # status started, started_at, worker_name
        recorded_executions.append(Execution.create(stand_in, lease_seconds, pipeline=pipe, worker_name=worker_name))
        pipe.persist(stand_in.key)

    commands = recorded(conn, start)
    args = [
        Job.redis_job_namespace_prefix,
        most,
        wake_key(),
        claim_record_key(take_id),
        CLAIM_RECORD_SECONDS,
        BATCH_FIELD,
        cancel_key(""),
        upload_key(""),
        _execution_prefix(conn),
        JOB_STAND_IN,
        QUEUE_STAND_IN,
        recorded_executions[0].id,
        woken,
        *framed([queue.name for queue in queues]),
        *framed(execution_ids[:most]),
        *framed(commands),
    ]
    reply = CLAIM_NEXT(conn, [queue.key for queue in queues], args)
    if not reply:
        return None
    number, rows, more = reply
    queue = queues[int(number) - 1]
    attempts = []
    for execution_id, (raw_id, token, cancelled, upload, flat) in zip(execution_ids, rows):
        if not int(token):
            continue
        job = Job(_text(raw_id), connection=conn, serializer=SERIALIZER)
        job.restore(dict(zip(flat[::2], flat[1::2])))
        execution = Execution(execution_id, job.id, conn, worker_name=worker_name)
        attempts.append(Attempt(job, queue, int(token), execution, cancel_seen=bool(cancelled), upload=upload or None))
    return Taken(queue, attempts, bool(more))


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


# KEYS: the jobs' hashes; ARGV per job: the attempt's token, "1" for an end, its commands
# (framed). Each job's commands run only while it is started under that token. Returns per
# job 1 (written), 2 (an end this token had written already) or 0 (refused: fenced out).
ENDS = Script(
    RUN
    + f"""
local out = {{}}
local a = 1
for i = 1, #KEYS do
  local token, final = ARGV[a], ARGV[a + 1]
  local first, last = a + 3, a + 2 + tonumber(ARGV[a + 2])
  a = last + 1
  local status = redis.call('HGET', KEYS[i], 'status')
  if status == '{JobStatus.STARTED.value}' and redis.call('HGET', KEYS[i], '{ATTEMPT_FIELD}') == token then
    run(ARGV, first, last)
    out[i] = 1
  elseif final == '1' and redis.call('HGET', KEYS[i], '{ENDED_FIELD}') == token then
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
"""
)


def write_ends(conn: Redis, ends: list[End]) -> list[bool]:
    """Write every fenced write of ``ends`` (of several jobs) in one round trip; per end,
    whether it holds (written now, or an end written before under the same token)."""
    if not ends:
        return []
    args: list[bytes | str | int] = []
    for end in ends:
        args += [end.attempt.token, "1" if end.final else "0", *framed(end.commands)]
    replies = ENDS(conn, [end.attempt.job.key for end in ends], args)
    return [int(r) > 0 for r in replies]


Also = Callable[[Pipeline], None] | None


def finishing(conn: Redis, attempt: Attempt, result: Any, result_ttl: int, also: Also = None) -> End:
    """The end of ``attempt`` as finished with ``result``, with ``also(pipe)`` (the result's
    index, the outcome count) in the same transaction."""
    job = attempt.job

    def write(pipe: Pipeline) -> None:
        _end_common(pipe, attempt, JobStatus.FINISHED)
        Result.create(job, Result.Type.SUCCESSFUL, result_ttl, return_value=result, pipeline=pipe)
        job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
        job.finished_job_registry.add(job, result_ttl, pipe)
        if also is not None:
            also(pipe)

    return End(attempt, recorded(conn, write))


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
