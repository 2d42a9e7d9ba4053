"""Work is queued by its cost, not its route: a classify with the stability score waits on the
explain queue, so a plain classify is never held behind one."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from jobs.queues import JobKind, lane_of
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e


def test_lane_of_a_job_is_its_cost():
    assert lane_of(JobKind.CLASSIFY) is JobKind.CLASSIFY
    assert lane_of(JobKind.CLASSIFY, stability=True) is JobKind.EXPLAIN
    assert lane_of(JobKind.EXPLAIN) is lane_of(JobKind.EXPLAIN, stability=True) is JobKind.EXPLAIN


def _post(client, image: bytes, **fields):
    resp = client.post(
        "/v1/classify",
        files={"image": ("x.png", image, "image/png")},
        data={"model": "tiny-grey", **{k: str(v) for k, v in fields.items()}},
    )
    assert resp.status_code == 202, resp.text  # no wait: every answer is 202 + Location
    assert resp.headers["location"] == resp.json()["url"]
    return resp.json()


def _running(client, url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(url).json()
        if view["status"] == "running" and view["progress"] and view["progress"]["done"] > 0:
            return view
        assert view["status"] in ("queued", "running"), view
        time.sleep(0.05)
    raise AssertionError(f"job {url} did not start")


def test_a_plain_classify_is_not_held_behind_stability_classifies(service_stack, make_image, poll, long_steps):
    """Both workers run a long stability classify and a third waits: a plain classify
    submitted then runs on the first worker to free up, ahead of the waiting stability one
    (on one FIFO queue it would wait for all three, minutes)."""
    settings = service_stack.model_copy(update={"classify_wait_seconds": 0.0})
    images = [make_image("PNG", "L", size=(28, 28), seed=700 + i) for i in range(4)]
    # The exact searches run their steps (the fast one takes about a hundred whatever the steps).
    long_stability = {"stability": "true", "stability_steps": long_steps, "stability_mode": "exact"}
    with api_client(settings) as client:
        slow = []
        try:
            for i in range(2):
                slow.append(_post(client, images[i], **long_stability)["url"])
            for url in slow:
                _running(client, url)
            waiting = _post(client, images[2], **long_stability)
            slow.append(waiting["url"])
            plain = _post(client, images[3])
            # Each is first on its own queue: the plain one on the high-priority classify queue.
            assert waiting["status"] == "queued" and waiting["queue_position"] == 0, waiting
            assert plain["status"] == "queued" and plain["queue_position"] == 0, plain
            assert client.get("/metrics").text.count('aex_queue_depth{queue="classify"} 1.0') == 1

            freed = client.delete(slow[0])  # frees one worker (202, or 200 once it has stopped)
            assert freed.status_code in (200, 202) and freed.json()["status"] in ("running", "cancelled"), freed.text
            done = poll(client, plain["url"], timeout=30)
            assert done["status"] == "finished" and done["kind"] == "classify" and "stability" not in done["result"]
            behind = client.get(waiting["url"]).json()
            started = behind["timings"]["started_at"]
            assert started is None or datetime.fromisoformat(started) >= datetime.fromisoformat(
                done["timings"]["started_at"]
            ), (behind, done)
        finally:
            for url in slow:
                client.delete(url)  # so the next test finds its workers free
        for url in slow:
            assert poll(client, url, timeout=30)["status"] == "cancelled"


def test_a_stability_classify_answers_as_before(api, make_image, poll):
    """Same API on the slow lane: 200 with the result within the wait, its kind classify."""
    resp = api.post(
        "/v1/classify",
        files={"image": ("x.png", make_image("PNG", "L", size=(28, 28), seed=9), "image/png")},
        data={"model": "tiny-grey", "stability": "true", "stability_steps": "3"},
    )
    assert resp.status_code in (200, 202), resp.text
    view = poll(api, resp.json()["url"]) if resp.status_code == 202 else resp.json()
    assert view["status"] == "finished" and view["kind"] == "classify" and "stability" in view["result"]
