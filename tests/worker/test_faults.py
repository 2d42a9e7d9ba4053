"""Fault suite: real worker processes on a real Redis with persistence (``aex.embedded_redis.EmbeddedRedis``
with its append-only file, supervised as `aex serve` runs it), the API served by uvicorn, and
the faults an operator meets: a worker SIGKILLed mid-job, Redis killed and started again while
idle and while busy (jobs queued and running), 50 concurrent clients.

Each scenario prints ``<scenario>: submitted N finished N retried N failed N lost N`` (and the
time /readyz took to answer 200 again after Redis was killed); every accepted job must end
finished (none lost, none failed) and /readyz must be back within 30 s. Every wait has a
deadline (marker e2e).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
from rq.job import Job

from jobs.keys import upload_key
from jobs.queues import QUEUE_NAMES, JobKind, connect
from jobs.rqueue.layout import SERIALIZER, live_worker_keys
from tests.support.tokens import auth_headers

# A client thread's failed assertion (a 500 where a 503 or an answer was due) fails the test,
# not only a warning.
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")]

READYZ_WITHIN = 30.0  # seconds: /readyz must answer 200 again this soon after Redis died
JOB_DEADLINE = 120.0  # seconds: an accepted job must have ended by then
EXPLAIN_STEPS = 2000  # a few seconds of search with the tiny model: long enough to be hit
TERMINAL = ("finished", "failed", "cancelled")


class Stack:
    """Redis (persistent, supervised), two workers and the API; ``base`` is the API's URL."""

    def __init__(self, server, settings, base: str, spawn: Callable[[], object]):
        self.server, self.settings, self.base, self.spawn = server, settings, base, spawn
        self.conn = connect(settings.redis_url)
        self.headers = auth_headers(settings)  # an admin key, kept by the append-only file like the rest
        self.workers = [spawn(), spawn()]
        self.wait_for_workers(2)

    def wait_for_workers(self, n: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(len(live_worker_keys(self.conn, q)) >= n for q in QUEUE_NAMES.values()):
            dead = [w for w in self.workers if w.proc.poll() is not None and w.proc.returncode != -signal.SIGKILL]
            assert not dead, "a worker exited:\n" + "\n".join(w.log()[-3000:] for w in dead)
            assert time.monotonic() < deadline, f"{n} workers did not register in {timeout} s"
            time.sleep(0.2)

    def kill_redis(self) -> float:
        """SIGKILL redis-server; returns when it was killed (time.monotonic())."""
        restarts, pid = self.server.restarts, self.server.pid
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + READYZ_WITHIN
        while self.server.restarts == restarts:
            assert time.monotonic() < deadline, "the supervisor did not start Redis again"
            time.sleep(0.05)
        return killed

    def readyz_back(self, since: float) -> float:
        """Seconds from ``since`` until /readyz answers 200."""
        with httpx.Client(base_url=self.base, timeout=10) as http:
            while True:
                try:
                    if http.get("/readyz").status_code == 200:
                        return time.monotonic() - since
                except httpx.TransportError:
                    pass
                assert time.monotonic() - since < READYZ_WITHIN, f"/readyz not 200 within {READYZ_WITHIN} s"
                time.sleep(0.1)

    def worker_pid(self, job_id: str) -> int:
        job = Job.fetch(job_id, connection=self.conn, serializer=SERIALIZER)
        return int(self.conn.hget(f"rq:worker:{job.worker_name}", "pid"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, settings_on, worker_process, serve_api):
    from aex.embedded_redis import EmbeddedRedis

    folder = tmp_path_factory.mktemp("faults")
    server = EmbeddedRedis(folder / "redis", persistent=True)
    server.start()
    server.supervise()
    settings = settings_on(server, 0, job_heartbeat_ttl=4, classify_wait_seconds=5.0)
    count = iter(range(100))
    spawned = []

    def spawn():
        spawned.append(worker_process(settings, folder / f"worker{next(count)}.log"))
        return spawned[-1]

    try:
        yield Stack(server, settings, serve_api(settings), spawn)
    finally:
        for w in spawned:
            w.stop(timeout=30)
        server.stop()


class Tally:
    """What happened to the jobs of one scenario, from the clients' side."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.counts: Counter[str] = Counter()
        self.ids: list[str] = []
        self.lock = threading.Lock()
        self.problems: list[str] = []

    def submit(self, http: httpx.Client, route: str, image: bytes, deadline: float, **fields) -> str:
        """POST until accepted (200 or 202): 503 while Redis restarts or no worker is
        registered, 429 while the queue is full are answered by trying again."""
        data = {k: str(v) for k, v in fields.items()}
        while True:
            try:
                resp = http.post(route, files={"image": ("x.png", image, "image/png")}, data=data)
            except httpx.TransportError:
                resp = None
            if resp is not None and resp.status_code in (200, 202):
                job_id = resp.json()["id"]
                with self.lock:
                    self.counts["submitted"] += 1
                    self.ids.append(job_id)
                return job_id
            assert resp is None or resp.status_code in (429, 503), f"{route}: {resp.status_code} {resp.text}"
            assert time.monotonic() < deadline, f"{route}: not accepted before the deadline"
            time.sleep(0.2)

    def settle(self, http: httpx.Client, job_id: str, deadline: float) -> None:
        """Poll the job to its end; one that Redis no longer knows, or that never ends, is lost."""
        while True:
            try:
                resp = http.get(f"/v1/jobs/{job_id}")
            except httpx.TransportError:
                resp = None
            if resp is not None and resp.status_code in (404, 410):
                return self._count("lost", f"{job_id}: {resp.status_code} {resp.text}")
            if resp is not None and resp.status_code == 200 and resp.json()["status"] in TERMINAL:
                view = resp.json()
                if view["status"] != "finished":
                    return self._count("failed", f"{job_id}: {view['status']} {view['error']}")
                job = Job.fetch(job_id, connection=self.stack.conn, serializer=SERIALIZER)
                with self.lock:
                    self.counts["retried"] += int(job.meta.get("retried") or 0)
                # The worker deletes the upload right after it has recorded the end.
                gone = time.monotonic() + 5
                while self.stack.conn.exists(upload_key(job_id)) and time.monotonic() < gone:
                    time.sleep(0.05)
                if self.stack.conn.exists(upload_key(job_id)):
                    self.problems.append(f"{job_id}: upload left after its end")
                return self._count("finished")
            assert resp is None or resp.status_code in (200, 503), f"{job_id}: {resp.status_code} {resp.text}"
            if time.monotonic() > deadline:
                return self._count("lost", f"{job_id}: still {resp.json()['status'] if resp else '?'} at the deadline")
            time.sleep(0.1)

    def _count(self, what: str, problem: str | None = None) -> None:
        with self.lock:
            self.counts[what] += 1
            if problem:
                self.problems.append(problem)

    def report(self, capsys, scenario: str, readyz: float | None = None) -> None:
        c = self.counts
        line = (
            f"{scenario}: submitted {c['submitted']} finished {c['finished']} retried {c['retried']} "
            f"failed {c['failed']} lost {c['lost']}"
        )
        if readyz is not None:
            line += f" (readyz back after {readyz:.1f} s)"
        with capsys.disabled():
            print("\n" + line)
        assert c["lost"] == 0, self.problems
        assert c["failed"] == 0 and c["finished"] == c["submitted"], self.problems
        assert not self.problems, self.problems
        if readyz is not None:
            assert readyz <= READYZ_WITHIN


def client(stack: Stack, tally: Tally, route: str, image: bytes, **fields) -> None:
    """One client: submit, then poll to the end (run in its own thread, with its own connection)."""
    deadline = time.monotonic() + JOB_DEADLINE
    with httpx.Client(base_url=stack.base, timeout=60, headers=stack.headers) as http:
        tally.settle(http, tally.submit(http, route, image, deadline, **fields), deadline)


def run_clients(targets: list[threading.Thread]) -> None:
    for t in targets:
        t.start()
    for t in targets:
        t.join(JOB_DEADLINE + 30)
        assert not t.is_alive(), "a client did not finish"


def running_with_progress(stack: Stack, job_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        job = Job.fetch(job_id, connection=stack.conn, serializer=SERIALIZER)
        if job.get_status(refresh=False) == "started" and (job.meta.get("progress") or {}).get("done", 0) > 0:
            return
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.05)


def test_a_worker_killed_mid_job_its_job_finishes_on_another(stack, make_image, capsys):
    tally = Tally(stack)
    threads = [
        threading.Thread(
            target=client,
            args=(stack, tally, "/v1/explain", make_image("PNG", "RGB", seed=100)),
            kwargs={"model": "tiny-rgb", "targets": "predicted", "steps": EXPLAIN_STEPS},
        )
    ]
    threads += [
        threading.Thread(
            target=client,
            args=(stack, tally, "/v1/classify", make_image("PNG", "RGB", seed=101 + i)),
            kwargs={"model": "tiny-rgb"},
        )
        for i in range(4)
    ]
    threads[0].start()
    deadline = time.monotonic() + 30
    while not tally.ids:
        assert time.monotonic() < deadline, "the explain job was not accepted"
        time.sleep(0.05)
    explain_id = tally.ids[0]
    running_with_progress(stack, explain_id)
    victim = stack.worker_pid(explain_id)
    os.kill(victim, signal.SIGKILL)
    stack.workers.append(stack.spawn())  # the replacement, as the pool of `aex serve` would start
    run_clients(threads[1:])
    threads[0].join(JOB_DEADLINE + 30)
    assert not threads[0].is_alive()
    job = Job.fetch(explain_id, connection=stack.conn, serializer=SERIALIZER)
    assert job.meta.get("retried") == 1, job.meta
    assert stack.worker_pid(explain_id) != victim, "the job ran again on another worker"
    tally.report(capsys, "worker SIGKILLed mid-job")
    stack.wait_for_workers(2)


def test_redis_killed_while_idle(stack, make_image, capsys):
    stack.wait_for_workers(2)
    tally = Tally(stack)
    client(stack, tally, "/v1/classify", make_image("PNG", "RGB", seed=199), model="tiny-rgb")
    assert (stack.server.folder / "aex.aof").is_file(), "the embedded Redis keeps an append-only file"
    killed = stack.kill_redis()
    readyz = stack.readyz_back(killed)
    # What Redis held before is still there (append-only file): the finished job and its result.
    with httpx.Client(base_url=stack.base, timeout=30, headers=stack.headers) as http:
        view = http.get(f"/v1/jobs/{tally.ids[0]}").json()
    assert view["status"] == "finished" and view["result"]["probs"], view
    run_clients(
        [
            threading.Thread(
                target=client,
                args=(stack, tally, "/v1/classify", make_image("PNG", "RGB", seed=200 + i)),
                kwargs={"model": "tiny-rgb"},
            )
            for i in range(5)
        ]
    )
    tally.report(capsys, "Redis SIGKILLed while idle", readyz)


def test_redis_killed_while_busy(stack, make_image, capsys):
    stack.wait_for_workers(2)
    tally = Tally(stack)
    explains = [
        threading.Thread(
            target=client,
            args=(stack, tally, "/v1/explain", make_image("PNG", "RGB", seed=300 + i)),
            kwargs={"model": "tiny-rgb", "targets": "predicted", "steps": EXPLAIN_STEPS},
        )
        for i in range(2)
    ]
    # One after the other: the second is submitted once the first runs, so it goes to the
    # other worker (two queued together would share one worker's batch).
    for started, explain in enumerate(explains, start=1):
        explain.start()
        deadline = time.monotonic() + 60
        while len(tally.ids) < started:
            assert time.monotonic() < deadline, "the explain job was not accepted"
            time.sleep(0.05)
        running_with_progress(stack, tally.ids[started - 1])
    # Both workers busy.
    deadline = time.monotonic() + 60
    classifies = [
        threading.Thread(
            target=client,
            args=(stack, tally, "/v1/classify", make_image("PNG", "RGB", seed=310 + i)),
            kwargs={"model": "tiny-rgb"},
        )
        for i in range(20)
    ]
    classify_clients = threading.Thread(target=run_clients, args=(classifies,))
    classify_clients.start()
    queue = QUEUE_NAMES[JobKind.CLASSIFY]
    while stack.conn.llen(f"rq:queue:{queue}") < 5:  # jobs waiting behind the running ones
        assert time.monotonic() < deadline, "no classify job queued"
        time.sleep(0.02)
    killed = stack.kill_redis()
    readyz = stack.readyz_back(killed)
    classify_clients.join(JOB_DEADLINE + 60)
    for explain in explains:
        explain.join(JOB_DEADLINE + 60)
    assert not classify_clients.is_alive() and not any(e.is_alive() for e in explains)
    tally.report(capsys, "Redis SIGKILLed while busy", readyz)


def test_50_concurrent_clients(stack, make_image, capsys):
    stack.wait_for_workers(2)
    tally = Tally(stack)
    run_clients(
        [
            threading.Thread(
                target=client,
                args=(stack, tally, "/v1/classify", make_image("PNG", "RGB", seed=400 + i)),
                kwargs={"model": "tiny-rgb"},
            )
            for i in range(50)
        ]
    )
    tally.report(capsys, "50 concurrent clients")


def test_job_ids_carry_the_epoch_of_the_store(tmp_path):
    """A job id made before Redis lost its data counts as lost; an id made since, or one aex
    never made (mistyped, invented, without valid check digits), does not."""
    from aex.embedded_redis import EmbeddedRedis
    from jobs.epoch import lost_in_restart, new_job_id, store_epoch

    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        conn = connect(server.url)
        before = new_job_id(conn)
        assert len(before) == 32 and before.startswith(store_epoch(conn)) and not lost_in_restart(conn, before)
        conn.flushall()  # what a restart without persistence leaves
        assert lost_in_restart(conn, before)
        assert not lost_in_restart(conn, new_job_id(conn))
        assert not lost_in_restart(conn, "0" * 32) and not lost_in_restart(conn, before[:-1] + "x")
    finally:
        server.stop()
