"""A reused result is aex's own record (``service.reuse``), no rq job: its owner sees it as any
finished job, with the images of the job it copies; another principal gets the 404 of an
unknown id; it expires with the result it copies (marker e2e: real Redis, real workers)."""

from __future__ import annotations

import time

import pytest

from jobs.keys import reused_job_key
from jobs.queues import connect
from jobs.rqueue import result_ttl_left
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e

UNKNOWN = "0123456789abcdef0123456789abcdef"
USER = ("submit", "read")


def upload(data: bytes, **fields):
    return {"files": {"image": ("x.png", data, "image/png")}, "data": {k: str(v) for k, v in fields.items()}}


@pytest.fixture(scope="module")
def alice(service_stack):
    with api_client(service_stack, "reuse-alice", USER) as client:
        yield client


@pytest.fixture(scope="module")
def bob(service_stack):
    with api_client(service_stack, "reuse-bob", USER) as client:
        yield client


def same_as_unknown(resp, job_id: str, client, path: str) -> None:
    missing = client.get(path.replace(job_id, UNKNOWN)) if resp.request.method == "GET" else None
    missing = missing or client.delete(path.replace(job_id, UNKNOWN))
    assert resp.status_code == missing.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == missing.json()["error"]["code"] == "unknown_job"
    assert resp.json()["error"]["message"].replace(job_id, UNKNOWN) == missing.json()["error"]["message"]


def test_a_reused_job_is_its_owners_finished_job_and_no_one_elses(service_stack, alice, bob, api, make_image, poll):
    data = make_image("PNG", "RGB", seed=71)
    fields = dict(model="tiny-rgb", targets="predicted", steps=3, rho=0.1)
    resp = alice.post("/v1/explain", **upload(data, **fields))
    assert resp.status_code == 202, resp.text
    first = poll(alice, resp.headers["location"])
    assert first["status"] == "finished" and first["result"]["reused"] is False

    resp = alice.post("/v1/explain", **upload(data, **fields))
    assert resp.status_code == 200, resp.text
    reused = resp.json()
    job_id = reused["id"]
    assert job_id != first["id"] and first["id"] not in resp.text and reused["result"]["reused"] is True
    conn = connect(service_stack.redis_url)
    assert conn.exists(reused_job_key(job_id)) and not conn.exists(f"rq:job:{job_id}")  # no rq job
    assert 0 < conn.ttl(reused_job_key(job_id)) <= result_ttl_left(conn, first["id"])

    view = alice.get(f"/v1/jobs/{job_id}")
    assert view.status_code == 200 and first["id"] not in view.text
    shown = view.json()
    assert shown["status"] == "finished" and shown["kind"] == "explain" and shown["model"] == "tiny-rgb"
    assert shown["queue_position"] is None and shown["error"] is None and shown["callback"] is None
    assert shown["timings"]["queued_seconds"] == 0.0 and shown["timings"]["run_seconds"] == 0.0
    assert {k: v for k, v in shown.items() if k != "timings"} == {k: v for k, v in reused.items() if k != "timings"}
    assert set(shown["images"]) == set(first["images"]) and shown["images"]
    for name, url in shown["images"].items():
        assert url == f"/v1/jobs/{job_id}/images/{name}"
        image = alice.get(url)
        assert image.status_code == 200 and image.content == alice.get(first["images"][name]).content
        same_as_unknown(bob.get(url), job_id, bob, url)
    no_dicom = alice.get(f"/v1/jobs/{job_id}/dicom/x.dcm")  # a PNG input has none
    assert no_dicom.status_code == 404 and "has no DICOM object" in no_dicom.json()["error"]["message"]

    # Another principal: the 404 of an id that does not exist, for every route.
    same_as_unknown(bob.get(f"/v1/jobs/{job_id}"), job_id, bob, f"/v1/jobs/{job_id}")
    same_as_unknown(bob.delete(f"/v1/jobs/{job_id}"), job_id, bob, f"/v1/jobs/{job_id}")
    assert api.get(f"/v1/jobs/{job_id}").status_code == 200  # an admin sees every job

    # Cancelling it shows it as it is: it is over.
    cancelled = alice.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "finished"
    assert alice.get(f"/v1/jobs/{job_id}").json()["result"] == shown["result"]


def test_a_reused_job_expires_with_the_result_it_copies(service_stack, alice, make_image, poll):
    data = make_image("PNG", "RGB", seed=72)
    resp = alice.post("/v1/classify", **upload(data, model="tiny-rgb"))
    assert resp.status_code == 200 and resp.json()["result"]["reused"] is False, resp.text
    source = resp.json()["id"]
    conn = connect(service_stack.redis_url)
    conn.expire(f"rq:results:{source}", 8)  # the source's result is kept 8 s more

    resp = alice.post("/v1/classify", **upload(data, model="tiny-rgb"))
    assert resp.status_code == 200 and resp.json()["result"]["reused"] is True, resp.text
    job_id = resp.json()["id"]
    assert 0 < conn.ttl(reused_job_key(job_id)) <= 8
    assert alice.get(f"/v1/jobs/{job_id}").status_code == 200
    deadline = time.monotonic() + 60
    while conn.exists(reused_job_key(job_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = alice.get(f"/v1/jobs/{job_id}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_job", gone.text
