"""Dynamic batching (worker/batching.py, worker/batch_run.py): jobs queued together run as one
batch, each with its own result, failure and cancel; a job of another model runs alone; jobs a
dead worker left taken but not started are queued again. A Redis server of this module's own
and real worker processes (marker e2e)."""

from __future__ import annotations

import time

import pytest
import torch
from rq.job import Job
from rq.queue import Queue

from jobs.keys import cancel_key, upload_key
from jobs.queues import QUEUE_NAMES, JobKind, connect
from jobs.rqueue.layout import SERIALIZER
from jobs.rqueue.taking import requeue_stranded
from models.data.tensors import load_image_for_model
from models.store.checkpoint import load_checkpoint
from tests.support.tokens import api_client
from worker.batching import batch_signature, fitting

pytestmark = pytest.mark.e2e

# Long enough for the test to submit every job inside one batch window, on a loaded machine.
WAIT_MS = 3000


@pytest.fixture(scope="module")
def redis_of_module(tmp_path_factory):
    from aex.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-batching"))
    server.start()
    yield server
    server.stop()


def submit(client, image: bytes, model: str) -> str:
    resp = client.post(
        "/v1/classify", files={"image": ("x.png", image, "image/png")}, data={"model": model, "top_k": "3"}
    )
    assert resp.status_code in (200, 202), resp.text
    return resp.json()["id"]


def wait_all(client, ids, timeout=120.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    views: dict[str, dict] = {}
    while time.monotonic() < deadline:
        views = {i: client.get(f"/v1/jobs/{i}").json() for i in ids}
        if all(v["status"] in ("finished", "failed", "cancelled") for v in views.values()):
            return views
        time.sleep(0.1)
    raise AssertionError(f"jobs did not end: {[v['status'] for v in views.values()]}")


def test_queued_jobs_share_one_batch_and_keep_their_own_ends(
    redis_of_module, settings_on, start_workers, make_image, service_models
):
    settings = settings_on(redis_of_module, 0, max_batch=16, batch_wait_ms=WAIT_MS, classify_wait_seconds=0.0)
    conn = connect(settings.redis_url)
    start_workers(settings, 1)
    images = [make_image("PNG", "RGB", size=(40 + i, 36), seed=i) for i in range(5)]
    with api_client(settings) as client:
        # A: the leader; B: its upload gone before the batch runs (fails alone); C: cancelled
        # after a worker took it; D, E: plain; then a job of another model (back in the queue,
        # it runs alone after the batch).
        ids = [submit(client, img, "tiny-rgb") for img in images]
        conn.delete(upload_key(ids[1]))
        conn.set(cancel_key(ids[2]), 1)
        grey = submit(client, make_image("PNG", "L", size=(30, 30), seed=9), "tiny-grey")
        views = wait_all(client, [*ids, grey])

    a, b, c, d, e = (views[i] for i in ids)
    assert b["status"] == "failed" and b["error"]["code"] == "bad_parameter", b
    assert "expired" in b["error"]["message"]
    assert c["status"] == "cancelled", c
    model, meta = load_checkpoint(service_models / "tiny-rgb" / "model.safetensors")
    for i, view in ((0, a), (3, d), (4, e)):
        assert view["status"] == "finished", view
        result = view["result"]
        # Batched with A, C, D and E (B's input failed before the forward pass).
        assert result["provenance"]["method"]["batch_size"] == 4
        x = load_image_for_model(images[i], meta.input_size, meta.in_channels)
        with torch.no_grad():
            alone = model.eval()(x[None]).softmax(1)[0]
        got = torch.tensor([result["probs"][name] for name in meta.classes])
        assert torch.allclose(got, alone, atol=1e-5), (got, alone)  # its own answer, not a mate's
        assert result["predicted"]["class_index"] == int(alone.argmax())
    assert views[grey]["status"] == "finished"
    assert views[grey]["result"]["provenance"]["method"]["batch_size"] == 1
    assert views[grey]["result"]["model"] == "tiny-grey"


def test_a_job_taken_but_never_started_is_queued_again(redis_of_module, settings_on, make_image):
    """A worker that died between taking a job (rq's intermediate list) and starting it: the
    clean-up puts the job back at the head of its queue instead of failing it."""
    settings = settings_on(redis_of_module, 1)
    conn = connect(settings.redis_url)
    queue = Queue(QUEUE_NAMES[JobKind.CLASSIFY], connection=conn, serializer=SERIALIZER)
    job = queue.enqueue("worker.tasks.classify", kwargs={"model": "tiny-rgb"}, job_id="stranded-1")
    conn.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")  # taken, never started
    assert queue.get_job_ids() == [] and requeue_stranded(conn, queue) == []  # first seen now
    # Seen over a minute ago: put back.
    conn.set(queue.intermediate_queue.get_first_seen_key(job.id), time.time() - 120)
    assert requeue_stranded(conn, queue) == [job.id]
    assert queue.get_job_ids() == [job.id] and queue.intermediate_queue.get_job_ids() == []
    assert Job.fetch(job.id, connection=conn, serializer=SERIALIZER).get_status() == "queued"


def test_batch_signature_separates_models_stability_and_references(redis_of_module):
    conn = connect(f"{redis_of_module.url}?db=1")
    queue = Queue(QUEUE_NAMES[JobKind.CLASSIFY], connection=conn, serializer=SERIALIZER)

    def job(**kw):
        meta = kw.pop("meta", {})
        func = kw.pop("func", "worker.tasks.classify")
        return queue.create_job(func, kwargs=kw, meta=meta)

    base = batch_signature(job(model="a", top_k=3))
    assert base is not None and base == batch_signature(job(model="a", top_k=5, window=[40, 400]))
    assert batch_signature(job(model="b")) != base
    assert batch_signature(job(model="a", stability=True, stability_steps=20)) != base
    assert batch_signature(job(model="a", meta={"pacs_reference": {"pacs": "x"}})) is None
    explain = batch_signature(job(model="a", func="worker.tasks.explain", targets=["cat"], rho=0.1, steps=35))
    assert explain is not None and explain != base
    # Targets and window may differ (rows of one search); the search settings may not.
    assert explain == batch_signature(
        job(model="a", func="worker.tasks.explain", targets=["dog"], rho=0.1, steps=35, window=[1, 2])
    )
    assert explain != batch_signature(job(model="a", func="worker.tasks.explain", targets=["cat"], rho=0.2, steps=35))
    assert explain != batch_signature(job(model="a", func="worker.tasks.explain", targets=["cat"], rho=0.1, steps=9))
    assert batch_signature(job(model="a", func="os.getpid")) is None
    # Jobs taken behind a leader: its mates are the prefix that shares its signature.
    a, b = job(model="a"), job(model="b")
    assert fitting(job(model="a"), [a, a, b, a], max_batch=16) == 2
    assert fitting(job(model="a"), [a, a, a], max_batch=3) == 2  # the leader and two mates
    assert fitting(job(model="a"), [a], max_batch=1) == 0  # batching off
    assert fitting(job(model="a", meta={"pacs_reference": {"pacs": "x"}}), [a], max_batch=16) == 0


def test_explain_jobs_share_their_searches_and_each_gets_its_own_explanation(
    redis_of_module, settings_on, start_workers, make_image, service_models
):
    from models.explain.adversarial import Explainer

    settings = settings_on(redis_of_module, 2, max_batch=8, batch_wait_ms=WAIT_MS)
    start_workers(settings, 1)
    images = [make_image("PNG", "RGB", size=(36, 36), seed=20 + i) for i in range(3)]
    targets = ["predicted", "runner-up,bird", "cat"]
    with api_client(settings) as client:
        ids = []
        for img, t in zip(images, targets):
            resp = client.post(
                "/v1/explain",
                files={"image": ("x.png", img, "image/png")},
                data={"model": "tiny-rgb", "targets": t, "steps": "4", "rho": "0.08"},
            )
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["id"])
        views = wait_all(client, ids)
    model, meta = load_checkpoint(service_models / "tiny-rgb" / "model.safetensors")
    for img, t, job_id in zip(images, targets, ids):
        view = views[job_id]
        assert view["status"] == "finished", view
        result = view["result"]
        assert result["provenance"]["method"]["batch_size"] == 3
        x = load_image_for_model(img, meta.input_size, meta.in_channels)
        alone = Explainer(model, meta.classes, rho=0.08, steps=4).explain(x, t.split(","))
        assert [r["class_index"] for r in result["targets"]] == [a.class_index for a in alone.targets]
        for got, want in zip(result["targets"], alone.targets):
            assert got["rms"] == pytest.approx(want.rms, rel=1e-4, abs=1e-7)
            assert got["prob_after"] == pytest.approx(want.prob_after, abs=1e-5)
        assert result["predicted"]["class_index"] == alone.predicted
        assert result["stability"]["predicted"] == alone.predicted
