"""rq's worker loop as aex runs it (part of the adapter over rq, ``jobs.rqueue``): ``QueueWorker`` is rq's
``SimpleWorker`` with every override of rq's machinery that aex needs, so the worker runtime
(``worker.process``) implements only what it does with a job it has taken (``run_taken``) and
how it stops the job in hand (``stop_running``).

- jobs run in the worker process itself (models loaded once serve every job; CUDA works);
- the dequeue is aex's: the next job and the jobs waiting behind it that share its batch (up
  to ``take_at_once``) are taken and claimed in one round trip (``claiming.claim_next``): a
  job is in its queue until a worker holds it under its attempt token and lease; the
  worker is busy from the claim on (a SIGTERM lets the jobs it claimed run);
- short registrations (``worker_ttl``) with the worker's catalogue, made again when Redis lost
  them, so /readyz sees a dead worker within seconds; one heartbeat a second at most, in one
  round trip with the check that the registration is still there, carrying the worker's
  state (rq would write it with a round trip of its own twice per job);
- the store refusing or away (``jobs.queues.STORE_UNAVAILABLE``): heartbeats and maintenance
  are skipped and done again at the next turn; registering and dequeueing wait with a
  growing pause; the worker never quits over it;
- the maintenance cleans aex's way (``clean``: reaping under the attempt tokens);
- rq's stop-job command for the job in hand calls ``stop_running``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

from rq import get_current_job, worker_registration
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from jobs.keys import CATALOGUE_FIELD
from jobs.queues import STORE_UNAVAILABLE
from jobs.roundtrips import process_total
from jobs.rqueue.claiming import Taken, claim_next, execution_ids_for, take_recorded, wait_and_claim_next
from jobs.rqueue.layout import SERIALIZER, TIME_LIMIT_EXCEEDED, time_limit_of
from jobs.rqueue.lifecycle import Attempt
from jobs.rqueue.reaping import queues_by_priority

log = logging.getLogger("aex.worker")

# An idle worker sends a heartbeat (and registers again if Redis lost it) at least this often.
REREGISTER_WITHIN_SECONDS = 5
# The longest pause between two tries when the store refuses a worker's writes.
MAX_BACKOFF_SECONDS = 5.0
# A worker sends at most one heartbeat (and looks whether it is suspended at most once) a second.
HEARTBEAT_EVERY_SECONDS = 1.0
# The field of a worker's registration holding the Redis round trips it had sent at its last
# heartbeat (``jobs.roundtrips``; written with the heartbeat, no round trip of its own).
ROUND_TRIPS_FIELD = "aex_redis_round_trips"


def current_job() -> Job:
    """The job whose function runs now (job functions run inside a worker's attempt)."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("job functions run inside a job of a worker")
    return job


class QueueWorker(SimpleWorker):
    """See the module docstring. ``name``, ``connection`` and the settings as rq's worker;
    ``catalogue``: what it serves, published in its registration; ``job_heartbeat_ttl``: the
    lease of a job in hand; ``queue_names``: the queues it takes jobs from (None: every one)."""

    # rq's dequeue loop waits this long at most between two tries to reach Redis (rq: 60 s).
    max_connection_wait_time = 2.0

    def __init__(
        self,
        connection,
        *,
        catalogue: list[dict[str, Any]] | None = None,
        job_heartbeat_ttl: int = 20,
        queue_names: Collection[str] | None = None,
        **kwargs,
    ):
        queues = queues_by_priority(connection, queue_names)
        super().__init__(queues, connection=connection, serializer=SERIALIZER, **kwargs)
        self.catalogue = catalogue or []
        self.job_heartbeat_ttl = job_heartbeat_ttl
        self._beat_at = self._suspension_checked_at = float("-inf")
        # The attempts claimed with the job rq's loop hands to ``run_taken`` (it first: at most
        # ``take_at_once`` in all, from the same queue, sharing its batch signature), and how
        # long their take and claim took (seconds).
        self.take_at_once = 1
        self.claimed: list[Attempt] = []
        self.claim_seconds = 0.0
        self._look_first = True  # jobs may wait (at start, and after a take that left some)

    # --- what the runtime implements ----------------------------------------------------
    def run_taken(self, job: Job, queue: Queue) -> None:
        """Run ``job``, just taken from ``queue`` and claimed (its attempt is ``claimed[0]``,
        followed by those of the jobs claimed with it, the runtime's to run)."""
        raise NotImplementedError

    def stop_running(self) -> None:
        """Ask the job in hand to stop at its next step."""
        raise NotImplementedError

    def running_job_id(self) -> str | None:
        """The id of the job in hand (None when idle)."""
        return None

    def clean(self, queue_name: str) -> None:
        """This worker's share of the maintenance of ``queue_name``."""

    # --- rq's hooks --------------------------------------------------------------------
    def execute_job(self, job: Job, queue: Queue):
        self.set_state(WorkerStatus.BUSY)  # a SIGTERM from now on lets the jobs in hand finish
        try:
            self.run_taken(job, queue)
        finally:
            self.set_state(WorkerStatus.IDLE)

    def get_current_job_id(self) -> str | None:
        return self.running_job_id()

    def kill_horse(self, sig=None):
        # SimpleWorker has no horse process: ask the running job to stop at its next step.
        self.stop_running()

    def clean_registries(self):
        for queue in self.queues:
            self.clean(queue.name)
            worker_registration.clean_worker_registry(queue)
        self.last_cleaned_at = now()

    @contextmanager
    def time_limit(self, jobs: list[Job]) -> Iterator[None]:
        """Run the block under the shortest time limit of ``jobs`` (a job, or a batch computed
        as one); past it, ``TIME_LIMIT_EXCEEDED`` is raised in the block."""
        with self.death_penalty_class(min(time_limit_of(j) for j in jobs), TIME_LIMIT_EXCEEDED, job_id=jobs[0].id):
            yield

    # --- registration ------------------------------------------------------------------
    @property
    def dequeue_timeout(self) -> int:
        # Heartbeats happen between blocking dequeues: keep each well inside worker_ttl, and
        # short enough that a registration Redis lost (a restart) is made again in seconds.
        return max(1, min(self.worker_ttl // 3, REREGISTER_WITHIN_SECONDS))

    def heartbeat(self, timeout: int | None = None, pipeline=None):
        # rq adds 60 s to every registration; ours expire after worker_ttl so a dead worker
        # leaves /readyz and the catalogue quickly. rq's loop beats several times per job; one
        # a second (HEARTBEAT_EVERY_SECONDS) keeps a registration of worker_ttl >= 3 s alive.
        ttl = min(timeout or self.worker_ttl, self.worker_ttl)
        if pipeline is not None:
            self._beat(pipeline, ttl)
            return
        if time.monotonic() - self._beat_at < HEARTBEAT_EVERY_SECONDS:
            return
        with self._outage("sending its heartbeat"):
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.hexists(self.key, "birth")
                pipe.sismember(self.redis_workers_keys, self.key)
                self._beat(pipe, ttl)
                born, listed, *_ = pipe.execute()
            self._beat_at = time.monotonic()
            if not (born and listed):
                self._register_again()

    def _beat(self, conn, ttl: int) -> None:
        """rq's heartbeat (its registration's time and TTL), with its state (``set_state``) and
        this process's round trips so far."""
        self.last_heartbeat = now()
        beat = {
            "last_heartbeat": utcformat(self.last_heartbeat),
            "state": self.get_state(),
            ROUND_TRIPS_FIELD: process_total(),
        }
        conn.hset(self.key, mapping=beat)
        conn.expire(self.key, ttl)
        conn.expire(self.executions_key, ttl)

    def register_birth(self):
        self._until_accepted("registering", super().register_birth)

    def _ensure_registered(self) -> None:
        """Register again (catalogue included) when Redis no longer has this worker's
        registration: Redis restarted without persistence, or stayed away longer than
        worker_ttl. (A heartbeat alone would only recreate part of the hash.)"""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hexists(self.key, "birth")
            pipe.sismember(self.redis_workers_keys, self.key)
            born, listed = pipe.execute()
        if not (born and listed):
            self._register_again()

    def _register_again(self) -> None:
        log.warning("worker %s: Redis lost its registration (restarted?); registering again", self.name)
        self.last_heartbeat = now()
        with self.connection.pipeline() as pipe:
            pipe.delete(self.key)
            pipe.hset(self.key, mapping={**self.serialize(), "state": self.get_state()})
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.worker_ttl)
            pipe.execute()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_heartbeat_ttl

    def serialize(self) -> dict:
        return {**super().serialize(), CATALOGUE_FIELD: json.dumps(self.catalogue)}

    # --- riding out a store that refuses or is away --------------------------------------
    @contextmanager
    def _outage(self, doing: str) -> Iterator[None]:
        """Log the store refusing or unreachable (each command was already retried where it
        can be) and go on: what was skipped is done again at the next turn of the work loop."""
        try:
            yield
        except STORE_UNAVAILABLE as exc:
            log.warning(
                "worker %s: the store refused or was unreachable while %s (%s)", self.name, doing, type(exc).__name__
            )

    def _until_accepted(self, doing: str, call) -> Any:
        """``call()`` again, with a growing pause, until the store takes it (or a stop is asked)."""
        pause = 0.25
        while True:
            try:
                return call()
            except STORE_UNAVAILABLE as exc:
                if self._stop_requested:
                    raise
                log.warning("worker %s: the store refused %s (%s); trying again", self.name, doing, type(exc).__name__)
                time.sleep(pause)
                pause = min(MAX_BACKOFF_SECONDS, pause * 2)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """rq's loop of heartbeat, maintenance and dequeue, with aex's dequeue: the next jobs
        taken and claimed in one round trip (``claiming.claim_next``; ``claimed``), and the
        store refusing is waited out. ``timeout`` None (burst): None once the queues are empty."""
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        while True:
            # rq looks for a stop request only between jobs: one that came while this loop was
            # busy (a look that then claimed nothing) stops the worker here, nothing in hand.
            if self._stop_requested:
                raise StopRequested()
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            wait = 0.0 if timeout is None else float(timeout)
            # One take's names, kept while it is tried again: a take whose reply was lost,
            # sent again, returns what it claimed.
            take_id = uuid4().hex
            take = (take_id, execution_ids_for(take_id, max(1, self.take_at_once)))
            taken = self._until_accepted("taking a job", lambda wait=wait, take=take: self._claim_next(wait, *take))
            if taken is not None or timeout is None:
                self.heartbeat()
                if taken is None:
                    return None
                self.claimed = taken.attempts
                return self.claimed[0].job, taken.queue

    def _claim_next(self, wait: float, take_id: str, execution_ids: list[str]) -> Taken | None:
        """The next jobs claimed (``claim_next``), waiting at most ``wait`` seconds for one.
        Each job put in a queue pushes a wake-up (``taking.wake``): after a take that left no
        job waiting, the worker blocks on the wake list with its next take pipelined behind
        (``wait_and_claim_next``: woken and claimed in one round trip, made durable by the
        enqueue's own fsync), so an idle worker costs no empty look per job; a wake-up that
        finds nothing (another worker was faster) costs one look, and the end of each wait
        one more. Busy from the claim on: a SIGTERM while blocked stops the worker, after
        running what its take had claimed by then if anything (``_claimed_before_stop``)."""
        deadline = time.monotonic() + max(0.0, wait)
        take = (self.name, self.job_heartbeat_ttl)
        look = self._look_first or wait <= 0
        while True:
            if look:
                self.set_state(WorkerStatus.BUSY)  # a SIGTERM from the claim on lets the jobs claimed run
                taken = None
                try:
                    start = time.perf_counter()
                    taken = claim_next(
                        self.connection, self._ordered_queues, *take, self.take_at_once, take_id, execution_ids
                    )
                    self.claim_seconds = time.perf_counter() - start
                finally:
                    if not (taken and taken.attempts):
                        self.set_state(WorkerStatus.IDLE)
                if not (taken and taken.attempts) and self._stop_requested:
                    # A SIGTERM during the look found the worker busy (rq then only notes it):
                    # with nothing claimed it stops now instead of blocking for the next job.
                    raise StopRequested()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    taken = wait_and_claim_next(
                        self.connection, self._ordered_queues, *take, left, self.take_at_once, take_id, execution_ids
                    )
                    if taken and taken.attempts:
                        self.set_state(WorkerStatus.BUSY)
                except StopRequested:
                    taken = self._claimed_before_stop(take_id, execution_ids)
                    if taken is None:
                        raise
                except STORE_UNAVAILABLE:
                    # Its reply lost, the take may have claimed: tried again (by the caller,
                    # the same take), it looks at once and gets what it claimed.
                    self._look_first = True
                    raise
                # Claimed as it was woken: no time of its own (its reply waited for the
                # enqueue's fsync, which the queue wait counts).
                self.claim_seconds = 0.0
            self._look_first = bool(taken and taken.more)
            if taken and taken.attempts:
                return taken
            if wait <= 0:
                return None
            look = False

    def _claimed_before_stop(self, take_id: str, execution_ids: list[str]) -> Taken | None:
        """A SIGTERM came while blocked in ``wait_and_claim_next`` (its connection is closed,
        so Redis drops a take it has not run yet): what the take claimed if Redis ran it
        first (its reply was then on its way), marked busy to be run before the worker stops,
        as a warm shutdown runs what it holds; None when it claimed nothing."""
        try:
            if not take_recorded(self.connection, take_id):
                return None
            # The same take sent again returns what it claimed and claims nothing more.
            taken = claim_next(
                self.connection,
                self._ordered_queues,
                self.name,
                self.job_heartbeat_ttl,
                self.take_at_once,
                take_id,
                execution_ids,
            )
        except STORE_UNAVAILABLE:
            return None  # it stops now; what the take claimed waits out its lease, then runs again
        if not (taken and taken.attempts):
            return None
        self._stop_requested = True
        self.set_state(WorkerStatus.BUSY)
        return taken

    def set_state(self, state: str, pipeline=None):
        if pipeline is not None:
            return super().set_state(state, pipeline=pipeline)
        # Kept here (a SIGTERM reads it: busy, let the jobs in hand finish) and published with
        # the next heartbeat: rq would write it twice per job.
        self._state = state

    def check_for_suspension(self, burst: bool):
        # rq looks (with a heartbeat) before every job; once a second is soon enough for `rq suspend`.
        if time.monotonic() - self._suspension_checked_at < HEARTBEAT_EVERY_SECONDS:
            return
        self._suspension_checked_at = time.monotonic()
        with self._outage("checking for suspension"):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self):
        with self._outage("cleaning the registries"):
            super().run_maintenance_tasks()
