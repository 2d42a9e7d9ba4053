"""A worker asked to stop drains (what Kubernetes does to a pod it scales down or evicts:
SIGTERM, then SIGKILL after terminationGracePeriodSeconds): the batch in hand finishes, no job
is taken after the signal, and the process exits 0. And a worker serves only the queues
AEX_QUEUES names (one pool per queue, each scaled on its own backlog). Real ``python -m worker``
processes on a Redis of the module's own (marker e2e)."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime

import pytest
from rq.job import Job

from jobs.queues import QUEUE_NAMES, JobKind, connect
from jobs.rqueue.layout import SERIALIZER, live_worker_keys
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e

BATCH = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from aex.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("drain") / "redis")
    server.start()
    yield server
    server.stop()


def upload(data: bytes, **fields):
    return {"files": {"image": ("x.png", data, "image/png")}, "data": {k: str(v) for k, v in fields.items()}}


def statuses(client, urls: list[str]) -> list[str]:
    return [client.get(u).json()["status"] for u in urls]


def wait_for(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_sigterm_mid_batch_finishes_the_batch_and_takes_nothing_more(
    server, settings_on, make_image, poll, start_workers
):
    # The batch gathers all its mates (max_batch of them) well within its wait.
    settings = settings_on(server, 1, max_batch=BATCH, batch_wait_ms=5000.0, classify_wait_seconds=0.0)
    conn = connect(settings.redis_url)
    (worker,) = start_workers(settings, 1)
    with api_client(settings) as client:
        images = [make_image("PNG", "RGB", seed=800 + i) for i in range(BATCH + 1)]
        urls = [
            client.post("/v1/explain", **upload(im, model="tiny-rgb", targets="predicted", steps=3000)).headers[
                "location"
            ]
            for im in images[:BATCH]
        ]
        # Every job of the batch is claimed (running) before the signal; none has ended.
        wait_for(lambda: statuses(client, urls) == ["running"] * BATCH, "the batch did not start")
        workers = {Job.fetch(u.rsplit("/", 1)[-1], connection=conn, serializer=SERIALIZER).worker_name for u in urls}
        assert len(workers) == 1
        signalled = datetime.now(UTC)
        worker.proc.send_signal(signal.SIGTERM)
        # Submitted after the signal: the draining worker must leave it queued.
        late = client.post("/v1/classify", **upload(images[-1], model="tiny-rgb")).headers["location"]

        views = [poll(client, u, timeout=300) for u in urls]
        assert [v["status"] for v in views] == ["finished"] * BATCH, views
        # The signal came while the batch ran: each job ended after it.
        for url in urls:
            job = Job.fetch(url.rsplit("/", 1)[-1], connection=conn, serializer=SERIALIZER)
            assert job.ended_at.replace(tzinfo=UTC) >= signalled, (job.ended_at, signalled)
        assert worker.proc.wait(120) == 0, worker.log()[-3000:]
        assert client.get(late).json()["status"] == "queued"
        assert live_worker_keys(conn, QUEUE_NAMES[JobKind.CLASSIFY]) == []

        # Nothing was lost: the next worker takes the job the draining one left.
        start_workers(settings, 1)
        assert poll(client, late, timeout=120)["status"] == "finished"


def test_a_worker_serves_only_the_queues_it_is_given(server, settings_on, make_image, poll, worker_process, tmp_path):
    settings = settings_on(server, 2, classify_wait_seconds=0.0)
    conn = connect(settings.redis_url)
    started = []

    def start(kind: JobKind) -> None:
        worker = worker_process(settings.model_copy(update={"queues": [kind.value]}), tmp_path / f"{kind.value}.log")
        started.append(worker)
        wait_for(lambda: len(live_worker_keys(conn, QUEUE_NAMES[kind])) == 1, worker.log()[-3000:])

    try:
        _serve_one_queue_each(settings, conn, start, make_image, poll)
    finally:
        for worker in started:
            worker.stop(timeout=30)


def _serve_one_queue_each(settings, conn, start, make_image, poll) -> None:
    start(JobKind.EXPLAIN)
    assert live_worker_keys(conn, QUEUE_NAMES[JobKind.CLASSIFY]) == []
    with api_client(settings) as client:
        image = make_image("PNG", "RGB")
        # No worker serves the classify queue: the API says so instead of queueing.
        refused = client.post("/v1/classify", **upload(image, model="tiny-rgb"))
        assert refused.status_code == 503, refused.text
        start(JobKind.CLASSIFY)
        ran_on: dict[str, set[str]] = {"classify": set(), "explain": set()}
        for i in range(3):
            im = make_image("PNG", "RGB", seed=900 + i)
            for route, kind, fields in (("/v1/classify", "classify", {}), ("/v1/explain", "explain", {"steps": 20})):
                # 202 with its Location, or 200 when the job ended before the API read it back
                # (no wait is asked for, but a busy machine can hold the API that long): the
                # view's url either way.
                resp = client.post(route, **upload(im, model="tiny-rgb", **fields))
                assert resp.status_code in (200, 202), resp.text
                url = resp.json()["url"]
                assert poll(client, url, timeout=120)["status"] == "finished"
                job = Job.fetch(url.rsplit("/", 1)[-1], connection=conn, serializer=SERIALIZER)
                ran_on[kind].add(job.worker_name)
        # Each kind ran on its own pool's worker only.
        by_queue = {
            kind: {k.removeprefix("rq:worker:") for k in live_worker_keys(conn, QUEUE_NAMES[JobKind(kind)])}
            for kind in ran_on
        }
        assert ran_on == by_queue and not by_queue["classify"] & by_queue["explain"], (ran_on, by_queue)
