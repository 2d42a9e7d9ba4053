"""The stages of a request in its Server-Timing header, the worker's stages in the result's timings, and the
round trips each side sends (real Redis, real workers; marker e2e)."""

from __future__ import annotations

import hashlib

import pytest

from jobs.queues import connect
from service.audit import AuditLog, pending_key
from tests.support.stack import poll_job

pytestmark = pytest.mark.e2e


def server_timing(value: str) -> dict[str, str]:
    """{name: its dur or desc} of a Server-Timing header."""
    out = {}
    for item in value.split(","):
        name, *params = [p.strip() for p in item.split(";")]
        out[name] = next((p.partition("=")[2] for p in params if p.startswith(("dur=", "desc="))), "")
    return out


def upload(data: bytes, **fields):
    return {"files": {"image": ("x.png", data, "image/png")}, "data": {k: str(v) for k, v in fields.items()}}


def test_a_classify_answer_times_each_stage_and_counts_its_round_trips(api, make_image):
    resp = api.post("/v1/classify", **upload(make_image("PNG", "RGB", seed=1901), model="tiny-rgb"))
    assert resp.status_code == 200, resp.text
    stages = server_timing(resp.headers["server-timing"])
    expected = {"parse", "auth", "admission", "capacity", "seal", "enqueue", "wait", "view"}
    # No "audit-end": the final record of a 200 is written with the wait (AnswerAhead); a
    # "lookup" only where the job could not be written under what it would read (the first
    # submission the API makes, an earlier result, ...: service.jobs.JobService._start).
    assert expected | {"respond", "redis", "total"} <= set(stages) and "audit-end" not in stages, stages
    expected |= {"lookup"} & set(stages)
    durations = {k: float(v) for k, v in stages.items() if k != "redis"}
    assert all(v >= 0 for v in durations.values())
    # Stages are parts of the whole (each measured inside the middleware's span).
    assert sum(durations[k] for k in expected) <= durations["total"]
    assert int(stages["redis"]) > 0
    # The worker's stages before the computation, beside the computation's own.
    timings = resp.json()["result"]["provenance"]["timings"]
    assert {"claim_seconds", "gather_seconds", "read_seconds", "decode_seconds", "inference_seconds"} <= set(timings)
    assert all(v >= 0 for v in timings.values())


def test_every_v1_answer_is_timed_a_refused_one_too_and_nothing_else(api, make_image):
    refused = api.post("/v1/classify", **upload(make_image("PNG", "RGB")), headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401
    stages = server_timing(refused.headers["server-timing"])
    assert {"auth", "redis", "total"} <= set(stages) and "admission" not in stages
    view = api.post("/v1/explain", **upload(make_image("PNG", "RGB", seed=1902), model="tiny-rgb", steps=2))
    assert view.status_code == 202 and "enqueue" in server_timing(view.headers["server-timing"])
    done = poll_job(api, view.json()["url"])
    assert {"claim_seconds", "read_seconds"} <= set(done["result"]["provenance"]["timings"])
    assert "server-timing" not in api.get("/healthz").headers


def test_workers_publish_their_round_trips_with_their_heartbeat(service_stack, api, make_image):
    resp = api.post("/v1/classify", **upload(make_image("PNG", "RGB", seed=1903), model="tiny-rgb"))
    assert resp.status_code == 200, resp.text
    conn = connect(service_stack.redis_url)
    try:
        workers = [k.decode() for k in conn.smembers("rq:workers")]
        counts = [int(conn.hget(k, "aex_redis_round_trips") or 0) for k in workers]
    finally:
        conn.close()
    assert workers and all(c > 0 for c in counts), counts


def test_a_classify_answered_200_has_its_final_record_written_with_its_wait(service_stack, make_image, monkeypatch):
    """The audit record of a classify whose job finished within the wait is written in the
    wait's own round trip (``service.audit_answer.AnswerAhead``): exactly one record, status
    200, the job, the model and the input's digest, its time Redis's clock at the end (between
    the request and its answer), the pending record gone; two round trips in all once the
    API's caches are warm, and no lookup. A classify before it warms them (the key, the model catalogue, the
    scripts), and they are kept for the test: on a busy machine more than their few seconds
    may pass between two requests, and each looked up again costs round trips of its own."""
    from datetime import UTC, datetime

    from service.auth import apikeys
    from tests.support.tokens import api_client

    monkeypatch.setattr(apikeys, "AUTH_CACHE_SECONDS", 3600.0)
    kept = service_stack.model_copy(update={"catalogue_cache_seconds": 3600.0})
    with api_client(kept, "timing-cached", ("read", "submit")) as api:
        warm = api.post("/v1/classify", **upload(make_image("PNG", "RGB", seed=1905), model="tiny-rgb"))
        assert warm.status_code == 200, warm.text
        before = datetime.now(UTC)
        image = make_image("PNG", "RGB", seed=1904)
        resp = api.post("/v1/classify", **upload(image, model="tiny-rgb"))
        after = datetime.now(UTC)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    conn = connect(service_stack.redis_url)
    try:
        records = [r for r in AuditLog(conn).read(limit=10_000) if r["job_id"] == job["id"]]
        pending = conn.hvals(pending_key())
    finally:
        conn.close()
    (record,) = records
    assert (record["action"], record["status"], record["model"]) == ("POST /v1/classify", 200, "tiny-rgb")
    assert record["input_sha256"] == hashlib.sha256(image).hexdigest()
    at = datetime.fromisoformat(record["time"])
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= at <= after
    assert not any(job["id"].encode() in p for p in pending)
    # Its round trips: the enqueue (written under what a lookup would read), and the wait with
    # the reads and the record.
    stages = server_timing(resp.headers["server-timing"])
    assert int(stages["redis"]) == 2 and "lookup" not in stages, stages
