"""A running job's progress written only while the claim that made it still holds the job (part of the adapter
over rq, ``jobs.rqueue``).

rq's ``Job.save_meta`` writes a job's meta unconditionally. A worker cut off from Redis for
longer than its lease is blocked in such a write; meanwhile its job is reaped and ends on
another worker; when the link comes back, TCP delivers the blocked write, which would replace
the ended job's meta (its progress, its retry count) with the cut-off attempt's stale copy
(tests/deploy/test_multihost.py saw exactly that). Here the check and the write are one
script, so nothing can come between them: the meta is written only while the job is
``started`` under the claim this copy of the job was made by, known by the worker name and
start time that claim wrote (a reap removes both, and any later claim writes its own).
"""

from __future__ import annotations

from redis import Redis
from rq.job import Job, JobStatus
from rq.utils import utcformat

CHECKED_META = """
local held = redis.call('HMGET', KEYS[1], 'status', 'worker_name', 'started_at')
if held[1] == ARGV[1] and held[2] == ARGV[2] and held[3] == ARGV[3] then
  redis.call('HSET', KEYS[1], 'meta', ARGV[4])
  return 1
end
return 0
"""


def save_progress(conn: Redis, job: Job) -> bool:
    """Save ``job.meta`` while the claim of this copy of ``job`` still holds the job, in one
    round trip; False (nothing written) once it does not, or for a copy no claim made."""
    if job.started_at is None or not job.worker_name:
        return False
    args = [JobStatus.STARTED.value, job.worker_name, utcformat(job.started_at), job.serializer.dumps(job.meta)]
    return bool(conn.register_script(CHECKED_META)(keys=[job.key], args=args))
