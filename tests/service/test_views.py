"""Job views (service/views.py): a job record as GET /v1/jobs/{id} shows it, in each state: its queue position only while queued, progress, timings, a finished explanation's image and DICOM URLs (added to a copy, never to the record), a failure's or a cancellation's error, and its callback's delivery (read from a real Redis)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from jobs.queues import JobKind
from jobs.rqueue import JobRecord
from jobs.states import ApiStatus
from service.schemas import JobView
from service.views import job_view
from tests.support.dicom import write_dicom

DB = 7
JOB = "f" * 32
T0 = datetime(2026, 1, 2, 10, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def explained(service_models) -> dict:
    """A real explain result of a DICOM input (two targets, a tiny search), as a worker stores it."""
    import torch

    from jobs.params import ExplainParameters
    from worker.explaining import explain_result
    from worker.served import ServedModel

    served = ServedModel.load("tiny-grey", service_models / "tiny-grey.safetensors", torch.device("cpu"))
    yy, xx = np.mgrid[0:64, 0:80]
    data = write_dicom((xx * 4 + yy * 2).clip(0, 4095).astype(np.uint16), "MONOCHROME2", 1.0, 0.0, (1800, 3600))
    parameters = ExplainParameters.build(
        targets=["predicted", "runner-up"], rho=0.1, steps=3, layer=served.gradcam_layer, stability_steps=2
    )
    return explain_result(served, data, "dicom", parameters, bound_check=False).result.dump()


def record(status: ApiStatus, kind=JobKind.CLASSIFY, **fields) -> JobRecord:
    times = {"enqueued_at": T0}
    if status is not ApiStatus.QUEUED:
        times["started_at"] = T0 + timedelta(seconds=2)
    if status in (ApiStatus.FINISHED, ApiStatus.FAILED, ApiStatus.CANCELLED):
        times["ended_at"] = T0 + timedelta(seconds=5)
    return JobRecord(
        id=JOB, kind=kind, status=status, meta=fields.pop("meta", {}), model="tiny-grey", **times, **fields
    )


def test_a_queued_job_shows_its_place_and_no_start(conn):
    view = job_view(conn, record(ApiStatus.QUEUED), 3)
    assert (view.status, view.queue_position, view.url, view.kind) == ("queued", 3, f"/v1/jobs/{JOB}", "classify")
    assert view.timings.started_at is None and view.timings.run_seconds is None
    assert view.timings.queued_seconds > 0  # waiting since T0, up to now
    assert view.result is view.images is view.dicom is view.error is view.callback is None


def test_a_running_job_shows_its_progress_and_no_place(conn):
    progress = {"done": 4, "total": 10, "phase": "explain predicted"}
    view = job_view(conn, record(ApiStatus.RUNNING, meta={"progress": progress}), 3)
    assert view.queue_position is None and view.progress.model_dump(include=set(progress)) == progress
    assert view.timings.queued_seconds == 2.0 and view.timings.run_seconds > 0


def test_a_finished_explanation_lists_its_image_and_dicom_urls_on_a_copy(conn, explained):
    stored = {**copy.deepcopy(explained), "reused_from": "0" * 32}  # as older results carried it
    job = record(ApiStatus.FINISHED, JobKind.EXPLAIN, result=stored)
    kept = copy.deepcopy(stored)
    view = job_view(conn, job, None)
    assert job.result == kept  # the record is never written to
    base = f"/v1/jobs/{JOB}"
    assert view.timings.run_seconds == 3.0 and view.timings.queued_seconds == 2.0
    result = view.result  # as stored, the URLs added
    assert "reused_from" not in result  # never another job's id
    # Sent as stored, it is exactly what the validated view writes out.
    assert view.content() == view.typed().model_dump(mode="json")
    assert view.typed().result.targets[0].image_url == result["targets"][0]["image_url"]
    names = set(stored["files"].values()) | {t[k] for t in stored["targets"] for k in ("image", "difference")}
    assert view.images == {name: f"{base}/images/{name}" for name in names}
    assert view.dicom == {name: f"{base}/dicom/{name}" for name in stored["dicom_files"]}
    for target in result["targets"]:
        assert target["image_url"] == f"{base}/images/{target['image']}"
        assert target["difference_url"] == f"{base}/images/{target['difference']}"
        assert target["dicom_url"] == f"{base}/dicom/{target['dicom']}"


def test_a_finished_classify_is_sent_as_stored_and_reads_as_its_validated_view(conn, service_models):
    import torch

    from jobs.params import ClassifyParameters
    from tests.support.images import encode_image
    from worker.compute import classify_result
    from worker.served import ServedModel

    served = ServedModel.load("tiny-rgb", service_models / "tiny-rgb" / "model.safetensors", torch.device("cpu"))
    stored = classify_result(
        served, encode_image("PNG", "RGB", seed=3), "image", ClassifyParameters.build(top_k=3)
    ).dump()
    view = job_view(conn, record(ApiStatus.FINISHED, result=stored), None)
    assert view.result is stored  # not copied, not validated again
    content = view.content()
    assert list(content) == list(JobView.model_fields)  # the view's fields, in their order
    assert content == view.typed().model_dump(mode="json") and content["result"] == stored
    assert json.loads(json.dumps(content)) == content


def test_a_stored_result_that_is_not_finite_is_refused_as_its_model_refuses_it(conn):
    from fastapi.responses import JSONResponse

    from models.errors import NonFiniteResultError

    stored = {"top": [{"class_index": 0, "class_name": "cat", "prob": float("nan")}]}
    view = job_view(conn, record(ApiStatus.FINISHED, result=stored), None)
    with pytest.raises(ValueError):  # never written out as null, nor as NaN
        JSONResponse(view.content())
    with pytest.raises(NonFiniteResultError, match=r"top\[0\]\.prob"):
        view.typed()


@pytest.mark.parametrize(
    "status, meta, failure, error",
    [
        (
            ApiStatus.FAILED,
            {"error": {"code": "job_timeout", "message": "over 60 s"}},
            None,
            ("job_timeout", "over 60 s"),
        ),
        (
            ApiStatus.FAILED,
            {},
            "Traceback ...\nRuntimeError: the worker's own words\n",
            ("job_failed", "RuntimeError: the worker's own words"),
        ),
        (ApiStatus.FAILED, {}, None, ("job_failed", "the job failed")),
        (ApiStatus.CANCELLED, {}, None, ("job_cancelled", "the job was cancelled")),
    ],
)
def test_a_job_that_did_not_finish_shows_why(conn, status, meta, failure, error):
    view = job_view(conn, record(status, meta=meta, failure=failure), None)
    assert view.status == status.value and (view.error.code, view.error.message) == error
    assert view.result is None and view.images is None


def test_a_callback_shows_as_waiting_then_as_its_delivery_record_says_without_its_secrets(conn):
    from jobs.callbacks import callback_meta
    from jobs.crypto import DataCipher, generate_data_key
    from jobs.keys import callback_key

    url = "https://hooks.example.org/aex?token=s3cret"
    meta = {"callback": callback_meta(url, 5, 10.0, 1.0, 600, None, DataCipher.from_text(generate_data_key()))}
    job = record(ApiStatus.FINISHED, meta=meta, result=None)
    assert job_view(conn, job, None).callback == {
        "url": "https://hooks.example.org/aex",
        "state": "waiting",
        "attempts": 0,
    }
    delivered = {"url": url, "state": "delivered", "attempts": 2, "status": 204}
    conn.set(callback_key(JOB), json.dumps(delivered), ex=60)
    shown = job_view(conn, job, None).callback
    assert shown == {**delivered, "url": "https://hooks.example.org/aex"} and "s3cret" not in json.dumps(shown)
