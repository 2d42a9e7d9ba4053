"""DELETE racing the workers that take the job: every interleaving answers 200/202 with the
job's view, never a 5xx, and every job ends (cancelled, or finished when a worker was first)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e

JOBS = 200


def test_cancel_right_after_submit_never_answers_5xx(service_stack, make_image, poll):
    images = [make_image("PNG", "RGB", size=(24, 24), seed=1000 + i) for i in range(JOBS)]
    # No wait: the classify answers 202 while its job is queued, then the DELETE races the
    # two workers dequeuing it (queued, being taken, running or already over).
    settings = service_stack.model_copy(update={"classify_wait_seconds": 0.0, "reuse_results": False})
    with api_client(settings) as client:

        def submit_and_cancel(i: int) -> tuple[str, int, dict]:
            path, fields = (
                ("/v1/classify", {"model": "tiny-rgb"})
                if i % 2
                else ("/v1/explain", {"model": "tiny-rgb", "targets": "predicted", "steps": "2"})
            )
            resp = client.post(path, files={"image": ("x.png", images[i], "image/png")}, data=fields)
            assert resp.status_code in (200, 202), resp.text
            url = resp.json()["url"]
            if i % 3 == 0:
                time.sleep(0.002 * (i % 7))  # spread the DELETEs over the dequeue
            cancelled = client.delete(url)
            return url, cancelled.status_code, cancelled.json()

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(submit_and_cancel, range(JOBS)))
        server_errors = [(url, status, body) for url, status, body in answers if status >= 500]
        assert not server_errors, server_errors[:3]
        assert {status for _, status, _ in answers} <= {200, 202}, answers
        for url, status, body in answers:
            assert body["url"] == url and body["status"] in ("queued", "running", "finished", "cancelled"), body
            assert (status == 202) == (body["status"] in ("queued", "running")), body
        # Each job ends, and a cancelled one stays cancelled (never "finished" afterwards).
        ends = {}
        for url, _, body in answers:
            view = poll(client, url, timeout=60)
            ends[view["status"]] = ends.get(view["status"], 0) + 1
            if body["status"] == "cancelled":
                assert view["status"] == "cancelled", (body, view)
            assert view["status"] in ("finished", "cancelled"), view
        assert ends.get("cancelled", 0) > 0, ends
        print(f"{JOBS} submit+cancel in {time.monotonic() - start:.1f} s: {ends}")
