"""Kill-point fault suite: a worker SIGKILLed at a seeded random moment of a job's or a batch's life (with Redis
killed at the same moment now and then), Redis killed during a batch, Redis out of memory; every accepted job ends once, nothing is left behind.

Real worker processes on a real, persistent, supervised Redis (``aex.embedded_redis.EmbeddedRedis``), the
API in process. After each fault every accepted job must end ``finished`` (after a retry) or
``failed`` with a code, within a bounded wait; none may stay queued or running, and nothing of
it may be left in Redis (its upload, an id in a queue, an intermediate list or the started
registry, a place in its owner's job quota). No timing assertion: the moments are random and
seeded, the waits bounded (marker e2e).
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from rq.job import Job

from jobs.keys import upload_key
from jobs.queues import QUEUE_NAMES, connect
from jobs.rqueue.layout import SERIALIZER, live_worker_keys
from tests.support.images import encode_image
from tests.support.tokens import api_client

# A client thread's failed assertion (a 500 where a 503 or an answer was due) fails the test,
# not only a warning.
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")]

TRIALS = 20  # kill points, batching on and off in turn
JOB_DEADLINE = 150.0  # seconds: every accepted job of a trial has ended by then
TERMINAL = ("finished", "failed", "cancelled")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from aex.embedded_redis import EmbeddedRedis

    folder = tmp_path_factory.mktemp("kill-points")
    server = EmbeddedRedis(folder / "redis", persistent=True)
    server.start()
    server.supervise()
    yield server, folder
    server.stop()


class Workers:
    """Worker processes started with given settings, each stopped at the end."""

    def __init__(self, worker_process, folder):
        self.worker_process, self.folder, self.started = worker_process, folder, []

    def start(self, settings, conn):
        worker = self.worker_process(settings, self.folder / f"worker{len(self.started)}.log")
        self.started.append(worker)
        deadline = time.monotonic() + 180
        while not any(str(worker.pid) in (conn.hget(k, "pid") or b"").decode() for k in _live(conn)):
            assert worker.proc.poll() is None, worker.log()[-3000:]
            assert time.monotonic() < deadline, "the worker did not register"
            time.sleep(0.1)
        return worker

    def stop_all(self):
        for worker in self.started:
            worker.stop(timeout=30)


def kill_redis(server) -> None:
    """SIGKILL the embedded Redis; returns once its supervisor has started it again."""
    restarts = server.restarts
    os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.restarts == restarts:
        assert time.monotonic() < deadline, "the supervisor did not start Redis again"
        time.sleep(0.05)


def _live(conn) -> list[str]:
    return sorted({k for q in QUEUE_NAMES.values() for k in live_worker_keys(conn, q)})


def submit(client, image: bytes, **fields) -> str:
    """POST /v1/classify until accepted (503 while Redis restarts or refuses are tried again)."""
    deadline = time.monotonic() + 60
    while True:
        resp = client.post("/v1/classify", files={"image": ("x.png", image, "image/png")}, data=fields)
        if resp.status_code in (200, 202):
            return resp.json()["id"]
        assert resp.status_code in (429, 503), f"{resp.status_code} {resp.text}"
        assert time.monotonic() < deadline, f"not accepted: {resp.status_code} {resp.text}"
        time.sleep(0.2)


def settle(client, job_ids: list[str]) -> dict[str, dict]:
    """Poll every job to its end (bounded); returns the last views."""
    deadline = time.monotonic() + JOB_DEADLINE
    views: dict[str, dict] = {}
    pending = list(job_ids)
    while pending:
        job_id = pending.pop(0)
        resp = client.get(f"/v1/jobs/{job_id}")
        if resp.status_code == 200 and resp.json()["status"] in TERMINAL:
            views[job_id] = resp.json()
            continue
        assert resp.status_code in (200, 503), f"{job_id}: {resp.status_code} {resp.text}"
        assert time.monotonic() < deadline, f"{job_id} still {resp.json().get('status')} at the deadline"
        pending.append(job_id)
        time.sleep(0.05)
    return views


def settle_and_check(client, conn, job_ids: list[str], seed: int) -> dict[str, dict]:
    """Poll every job to its end, let the quota count once more (it forgets ended jobs when it
    counts: one more submission), then check each ended once and left nothing."""
    views = settle(client, job_ids)
    submit(client, encode_image("PNG", "RGB", seed=seed), model="tiny-rgb")
    assert_ended_once_and_clean(conn, views)
    return views


def assert_ended_once_and_clean(conn, views: dict[str, dict]) -> None:
    """Each job finished, or failed with a code; nothing of any of them left in Redis."""
    for view in views.values():
        assert view["status"] == "finished" or (view["status"] == "failed" and view["error"]["code"]), view
        if view["status"] == "finished":
            assert view["result"]["probs"], view
    ids = set(views)
    for name in QUEUE_NAMES.values():
        for key in (f"rq:queue:{name}", f"rq:queue:{name}:intermediate"):
            left = {v.decode() for v in conn.lrange(key, 0, -1)} & ids
            assert not left, f"{left} still in {key}"
        started = {m.decode().split(":")[0] for m in conn.zrange(f"rq:wip:{name}", 0, -1)} & ids
        assert not started, f"{started} still in the started registry of {name}"
    uploads = [job_id for job_id in ids if conn.exists(upload_key(job_id))]
    assert not uploads, f"uploads left: {uploads}"
    held = {m.decode() for key in conn.scan_iter("aex:principal-jobs:*") for m in conn.zrange(key, 0, -1)} & ids
    assert not held, f"{held} still count against their owner's quota"


def test_a_worker_killed_at_random_moments_leaves_no_job_behind(store, settings_on, worker_process, make_image, capsys):
    server, folder = store
    workers = Workers(worker_process, folder)
    base = dict(job_heartbeat_ttl=2, job_retries=2, maintenance_interval=2, classify_wait_seconds=0.0)
    settings = [
        settings_on(server, 1, max_batch=16, batch_wait_ms=100.0, **base),
        settings_on(server, 1, max_batch=1, **base),
    ]
    conn = connect(settings[0].redis_url)
    rng = random.Random(1776)
    outcomes: dict[str, int] = {"finished": 0, "failed": 0, "retried": 0}
    try:
        victim = workers.start(settings[0], conn)
        with api_client(settings[0]) as client:
            for trial in range(TRIALS):
                n = rng.randint(1, 8)
                images = [make_image("PNG", "RGB", seed=10_000 + 100 * trial + i) for i in range(n)]
                stability = {"stability": "true", "stability_mode": "exact"} if rng.random() < 0.7 else {}
                ids = [submit(client, image, model="tiny-rgb", **stability) for image in images]
                time.sleep(rng.uniform(0.0, 1.2))  # the kill point: queued, claimed, computing, ending...
                os.kill(victim.pid, signal.SIGKILL)
                if trial % 5 == 4:  # now and then Redis (persistent) dies at the same moment
                    kill_redis(server)
                victim.proc.wait(30)
                victim = workers.start(settings[(trial + 1) % 2], conn)  # as the pool of `aex serve` would
                views = settle_and_check(client, conn, ids, seed=99_000 + trial)
                for job_id, view in views.items():
                    outcomes[view["status"]] = outcomes.get(view["status"], 0) + 1
                    outcomes["retried"] += int(
                        Job.fetch(job_id, connection=conn, serializer=SERIALIZER).meta.get("retried") or 0
                    )
        with capsys.disabled():
            print(f"\nkill points: {TRIALS} trials, {outcomes}")
        assert outcomes["retried"] > 0, "no kill point hit a job in hand: the trials tested nothing"
    finally:
        workers.stop_all()


def test_a_worker_killed_mid_batch_of_16(store, settings_on, worker_process, make_image):
    """16 classify jobs in one batch, each visibly running while it computes; the worker is
    killed then: each ends finished on another worker, none stranded, nothing left."""
    server, folder = store
    workers = Workers(worker_process, folder)
    settings = settings_on(
        server, 2, max_batch=16, batch_wait_ms=3000.0, job_heartbeat_ttl=2, classify_wait_seconds=0.0
    )
    conn = connect(settings.redis_url)
    try:
        victim = workers.start(settings, conn)
        with api_client(settings) as client:
            fields = {"model": "tiny-rgb", "stability": "true", "stability_mode": "exact"}
            ids = [submit(client, make_image("PNG", "RGB", seed=20_000 + i), **fields) for i in range(16)]
            deadline = time.monotonic() + 60
            while True:
                statuses = [client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in ids]
                if statuses.count("running") == 16:
                    break
                assert "finished" not in statuses, "the batch ended before it was seen running"
                assert time.monotonic() < deadline, statuses
                time.sleep(0.02)
            views = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
            assert all(v["timings"]["started_at"] for v in views), views
            os.kill(victim.pid, signal.SIGKILL)
            victim.proc.wait(30)
            workers.start(settings, conn)
            ended = settle_and_check(client, conn, ids, seed=20_999)
        assert all(v["status"] == "finished" for v in ended.values()), ended
    finally:
        workers.stop_all()


def test_redis_killed_during_a_batch(store, settings_on, worker_process, make_image):
    server, folder = store
    workers = Workers(worker_process, folder)
    settings = settings_on(
        server, 3, max_batch=16, batch_wait_ms=2000.0, job_heartbeat_ttl=3, classify_wait_seconds=0.0
    )
    conn = connect(settings.redis_url)
    try:
        workers.start(settings, conn)
        with api_client(settings) as client:
            fields = {"model": "tiny-rgb", "stability": "true", "stability_mode": "exact"}
            ids = [submit(client, make_image("PNG", "RGB", seed=30_000 + i), **fields) for i in range(8)]
            deadline = time.monotonic() + 60
            while client.get(f"/v1/jobs/{ids[-1]}").json()["status"] != "running":
                assert time.monotonic() < deadline, "the batch did not start"
                time.sleep(0.02)
            kill_redis(server)
            ended = settle_and_check(client, conn, ids, seed=30_999)
        assert all(v["status"] == "finished" for v in ended.values()), ended
    finally:
        workers.stop_all()


def test_redis_out_of_memory(store, settings_on, worker_process, make_image):
    """maxmemory reached with noeviction: the API answers 503 store_unavailable (never 500),
    the worker rides it out (it neither exits nor restarts), and every accepted job ends once
    memory is available again."""
    server, folder = store
    workers = Workers(worker_process, folder)
    settings = settings_on(server, 4, job_heartbeat_ttl=3, classify_wait_seconds=0.0)
    conn = connect(settings.redis_url)
    try:
        worker = workers.start(settings, conn)
        with api_client(settings) as client:
            accepted, refused = [], 0
            used = int(conn.info("memory")["used_memory"])
            conn.config_set("maxmemory-policy", "noeviction")
            conn.config_set("maxmemory", used + 256 * 1024)
            try:
                for i in range(60):
                    resp = client.post(
                        "/v1/classify",
                        files={"image": ("x.png", make_image("PNG", "RGB", seed=40_000 + i), "image/png")},
                        data={"model": "tiny-rgb"},
                    )
                    assert resp.status_code < 500 or resp.status_code == 503, resp.text
                    if resp.status_code == 503:
                        assert resp.json()["error"]["code"] in ("store_unavailable", "service_unavailable"), resp.text
                        assert resp.headers.get("retry-after"), resp.headers
                        refused += 1
                    elif resp.status_code in (200, 202):
                        accepted.append(resp.json()["id"])
                    views_ok = client.get("/v1/jobs/" + accepted[0]) if accepted else None
                    assert views_ok is None or views_ok.status_code in (200, 503), views_ok.text
                assert refused, "maxmemory was never reached: the test did not test anything"
                time.sleep(3 * settings.job_heartbeat_ttl)  # the worker meets the refusals too
                assert worker.proc.poll() is None, "the worker exited when Redis refused its writes"
            finally:
                conn.config_set("maxmemory", 0)
            ended = settle(client, accepted)
        assert worker.proc.poll() is None
        for view in ended.values():
            assert view["status"] == "finished" or view["error"]["code"], view
    finally:
        workers.stop_all()
