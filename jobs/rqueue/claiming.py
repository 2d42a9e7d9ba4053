"""Taking and claiming a worker's next batch in one round trip (``claim_next``): the leader at the head of the first non-empty queue and the jobs behind it that share its batch, each claimed as ``lifecycle.claim`` claims one.

A job stays in its queue until it is claimed, so no worker ever holds a job that is in no
list; a take sent again after its reply was lost returns what it claimed the first time and
claims nothing more (the take's record, ``claim_record_key``).
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import uuid4

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError, ResponseError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue

from jobs.batches import BATCH_FIELD
from jobs.keys import cancel_key, claim_record_key, upload_key, wake_key
from jobs.rqueue.layout import SERIALIZER, restore_job
from jobs.rqueue.lifecycle import ATTEMPT_FIELD, Attempt, _text
from jobs.scripts import RUN_REPLACING, UTC_NOW, Script, framed, recorded, refusal

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
# off the wake list itself (blocking on it), [14] 1 to stamp each job's start with Redis's
# clock (a take sent ahead, ``wait_and_claim_next``: rq's stamps in its commands were taken
# when they were recorded, maybe seconds earlier), then the queues' names (framed), the
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
    UTC_NOW
    + RUN_REPLACING
    + """
local prefix, most, wake, record, record_ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local batch_field, cancel, upload, execution_prefix = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local job_in, queue_in, execution_in, woken = ARGV[10], ARGV[11], ARGV[12], tonumber(ARGV[13])
local stamp = ARGV[14] == '1'
local a = 15
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

local function now_utc()
  -- rq's format of a UTC time: YYYY-MM-DDTHH:MM:SS.ffffffZ
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', utc_now())
end
local function claim(id, queue, execution)
  local token = redis.call('HINCRBY', prefix .. id, 'ATTEMPT', 1)
  run_replacing(ARGV, first, last, {{job_in, id}, {queue_in, queue}, {execution_in, execution}})
  if stamp then
    local started = now_utc()
    redis.call('HSET', prefix .. id, 'started_at', started, 'last_heartbeat', started)
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
    take = _Take(conn, queues, worker_name, lease_seconds, most, take_id, execution_ids)
    return take.taken(CLAIM_NEXT(conn, take.keys, take.args(woken, stamp=False)))


def wait_and_claim_next(
    conn: Redis,
    queues: list[Queue],
    worker_name: str,
    lease_seconds: int,
    seconds: float,
    most: int = 1,
    take_id: str | None = None,
    execution_ids: list[str] | None = None,
) -> Taken | None:
    """``claim_next`` once a job is put in a queue (a wake-up taken off the wake list), or
    when ``seconds`` have passed, in one round trip: the take is pipelined behind the blocking
    BLPOP, and Redis runs it as soon as the BLPOP returns, in the same turn of its loop. With
    an fsync per write, the take is then made durable by the fsync of the enqueue that woke
    it, where a take sent after the wake-up waited for one of its own (0.3-0.8 ms on this
    disk, on the path of every request that finds the worker idle). A take that finds
    nothing (another worker was faster, or the time ran out) claims nothing.

    The take's commands are recorded before it blocks: each job's start is stamped with
    Redis's clock when it is claimed, and ``seconds`` is cut to a quarter of the lease, so a
    lease recorded that much ahead still has three quarters of its time when it is claimed
    (the worker renews it every third)."""
    take = _Take(conn, queues, worker_name, lease_seconds, most, take_id, execution_ids)
    with conn.pipeline(transaction=False) as pipe:
        pipe.blpop([wake_key()], timeout=max(0.01, min(seconds, lease_seconds / 4)))
        # One wake-up taken off by the BLPOP; when it ran out instead, the take (which then
        # rarely finds a job) leaves one wake-up too many: it costs one look, never a job.
        pipe.evalsha(CLAIM_NEXT.sha, len(take.keys), *take.keys, *take.args(1, stamp=True))
        woke, reply = pipe.execute(raise_on_error=False)
    if isinstance(woke, Exception):
        raise woke
    if isinstance(reply, NoScriptError):  # Redis restarted or was flushed: loaded, then taken
        reply = CLAIM_NEXT(conn, take.keys, take.args(int(woke is not None), stamp=True))
    elif isinstance(reply, ResponseError):
        raise refusal(reply)
    return take.taken(reply)


def take_recorded(conn: Redis, take_id: str) -> bool:
    """Whether the take ``take_id`` claimed jobs (its record is kept CLAIM_RECORD_SECONDS)."""
    return bool(conn.exists(claim_record_key(take_id)))


class _Take:
    """One take of CLAIM_NEXT: its names, its arguments, and what its reply claimed."""

    def __init__(self, conn, queues, worker_name, lease_seconds, most, take_id, execution_ids) -> None:
        self.conn, self.queues, self.worker_name = conn, queues, worker_name
        self.most = max(1, most)
        self.take_id = take_id or uuid4().hex
        self.execution_ids = execution_ids or execution_ids_for(self.take_id, self.most)
        self.keys = [queue.key for queue in queues]
        stand_in = Job(JOB_STAND_IN, connection=conn, serializer=SERIALIZER)
        stand_in.origin = QUEUE_STAND_IN
        executions: list[Execution] = []

        def start(pipe: Pipeline) -> None:
            stand_in.prepare_for_execution(worker_name, pipe)  # status started, started_at, worker_name
            executions.append(Execution.create(stand_in, lease_seconds, pipeline=pipe, worker_name=worker_name))
            pipe.persist(stand_in.key)

        self.commands = recorded(conn, start)
        self.execution_stand_in = executions[0].id

    def args(self, woken: int, *, stamp: bool) -> list:
        return [
            Job.redis_job_namespace_prefix,
            self.most,
            wake_key(),
            claim_record_key(self.take_id),
            CLAIM_RECORD_SECONDS,
            BATCH_FIELD,
            cancel_key(""),
            upload_key(""),
            _execution_prefix(self.conn),
            JOB_STAND_IN,
            QUEUE_STAND_IN,
            self.execution_stand_in,
            woken,
            int(stamp),
            *framed([queue.name for queue in self.queues]),
            *framed(self.execution_ids[: self.most]),
            *framed(self.commands),
        ]

    def taken(self, reply) -> Taken | None:
        if not reply:
            return None
        number, rows, more = reply
        queue = self.queues[int(number) - 1]
        attempts = []
        for execution_id, (raw_id, token, cancelled, upload, flat) in zip(self.execution_ids, rows):
            if not int(token):
                continue
            job = Job(_text(raw_id), connection=self.conn, serializer=SERIALIZER)
            restore_job(job, dict(zip(flat[::2], flat[1::2])))
            execution = Execution(execution_id, job.id, self.conn, worker_name=self.worker_name)
            attempts.append(
                Attempt(job, queue, int(token), execution, cancel_seen=bool(cancelled), upload=upload or None)
            )
        return Taken(queue, attempts, bool(more))
