"""The one job service behind the routes (service/jobs.py) on a real Redis, without a worker process: admission, the upload sealed, the job queued and owned, a principal's share, views, outputs, cancelling, and a finished result answering the same request again (its ending written by the workers' own functions, tests.support.jobs)."""

from __future__ import annotations

import pytest

from jobs.crypto import blob_context, cipher_from_settings
from jobs.keys import upload_key
from jobs.queues import JobKind
from jobs.rqueue import queue_depth
from models.errors import (
    BadParameterError,
    QueueFullError,
    ServiceUnavailableError,
    TooManyJobsError,
    UnknownJobError,
    UnknownModelError,
)
from service.auth.principal import Principal
from service.catalogue import Catalogue
from service.jobs import JobService, unknown_job
from service.multipart import Upload
from service.schemas import ClassifyParams, ExplainParams
from tests.support.images import encode_image
from tests.support.jobs import finish_next, idle_worker

DB = 3
ALICE = Principal("key", "alice", scopes=frozenset({"submit", "read"}))
BOB = Principal("key", "bob", scopes=frozenset({"submit", "read"}))
ADMIN = Principal("key", "root", scopes=frozenset({"admin"}))


def png(seed: int = 0) -> Upload:
    return Upload(encode_image("PNG", "RGB", seed=seed), "picture.png")


def uploads(conn) -> list[bytes]:
    return sorted(conn.scan_iter(match=upload_key("*")))


@pytest.fixture
def make_service(conn, settings_for):
    """make(**settings) -> JobService on database DB (classify answers at once: no wait)."""

    def make(**overrides) -> JobService:
        settings = settings_for(DB, classify_wait_seconds=0.0, **overrides)
        return JobService(conn, settings, Catalogue(settings), cipher_from_settings(settings.data_key))

    return make


@pytest.fixture(scope="module")
def computed(service_models) -> dict:
    """What a worker computes for ``png(5)`` with tiny-rgb and top_k 3 (the workers' own function)."""
    import torch

    from jobs.params import ClassifyParameters
    from worker.compute import classify_result
    from worker.served import ServedModel

    served = ServedModel.load("tiny-rgb", service_models / "tiny-rgb" / "model.safetensors", torch.device("cpu"))
    return classify_result(served, png(5).data, "image", ClassifyParameters.build(top_k=3)).dump()


@pytest.fixture
def worker(conn):
    """An idle worker registered on both queues: jobs are admitted, and stay queued."""
    registered = idle_worker(conn)
    yield registered
    registered.register_death()


def test_without_a_worker_nothing_is_queued(conn, make_service):
    service = make_service()
    with pytest.raises(ServiceUnavailableError, match="no worker is serving the classify queue"):
        service.classify(ALICE, png(), ClassifyParams(model="tiny-rgb"))
    assert uploads(conn) == [] and queue_depth(conn, JobKind.CLASSIFY) == 0


def test_a_classify_is_queued_with_its_upload_sealed_and_belongs_to_its_submitter(conn, make_service, worker):
    service = make_service()
    upload = png(1)
    first = service.classify(ALICE, upload, ClassifyParams(model="tiny-rgb"))
    assert (first.status, first.kind, first.model, first.queue_position) == ("queued", "classify", "tiny-rgb", 0)
    assert first.result is None and first.error is None and first.url == f"/v1/jobs/{first.id}"
    stored = conn.get(upload_key(first.id))
    assert stored is not None and upload.data not in stored  # sealed, never the bytes themselves
    assert service.cipher.open(stored, blob_context(upload_key(first.id))) == upload.data
    second = service.classify(BOB, png(2), ClassifyParams(model="tiny-grey"))
    assert second.queue_position == 1 and second.id != first.id
    job = service.fetch(first.id)
    assert job.meta["owner"] == {"kind": "key", "id": "alice", "tenant": None}
    assert job.meta["input_sha256"] == upload.sha256 and job.meta["input_format"] == "image"
    # Another principal is told exactly what a job that does not exist is; admin sees it.
    with pytest.raises(UnknownJobError) as theirs:
        service.view(BOB, first.id)
    with pytest.raises(UnknownJobError) as none:
        service.view(BOB, "0" * 32)
    assert str(theirs.value.message) == unknown_job(first.id) and str(none.value.message) == unknown_job("0" * 32)
    assert service.view(ADMIN, first.id).status == "queued"
    with pytest.raises(UnknownJobError):
        service.view(ALICE, "../../etc")  # not a job id at all


def test_an_unknown_model_or_a_bad_upload_queues_nothing(conn, make_service, worker):
    service = make_service()
    with pytest.raises(UnknownModelError, match="served: tiny-grey, tiny-rgb"):
        service.classify(ALICE, png(), ClassifyParams(model="nope"))
    with pytest.raises(BadParameterError, match="DICOM input only"):
        service.classify(ALICE, png(), ClassifyParams(model="tiny-rgb", window_center=40, window_width=400))
    with pytest.raises(BadParameterError, match="AEX_MAX_EXPLAIN_STEPS"):
        service.explain(ALICE, png(), ExplainParams(model="tiny-rgb", steps=10**9))
    assert uploads(conn) == [] and queue_depth(conn, JobKind.CLASSIFY) == queue_depth(conn, JobKind.EXPLAIN) == 0


def test_a_principals_share_and_the_queues_depth_are_kept(conn, make_service, worker):
    service = make_service(max_jobs_per_principal=2, max_queue_depth=3)
    for seed in range(2):
        service.classify(ALICE, png(seed), ClassifyParams(model="tiny-rgb"))
    with pytest.raises(TooManyJobsError, match="AEX_MAX_JOBS_PER_PRINCIPAL"):
        service.classify(ALICE, png(9), ClassifyParams(model="tiny-rgb"))
    assert len(uploads(conn)) == 2  # the refused one left nothing
    service.classify(BOB, png(3), ClassifyParams(model="tiny-rgb"))
    with pytest.raises(QueueFullError, match="AEX_MAX_QUEUE_DEPTH = 3"):
        service.classify(BOB, png(4), ClassifyParams(model="tiny-rgb"))
    assert queue_depth(conn, JobKind.CLASSIFY) == 3


def test_an_explain_is_queued_on_its_own_queue_and_a_stability_classify_behind_it(conn, make_service, worker):
    service = make_service()
    view = service.explain(ALICE, png(), ExplainParams(model="tiny-rgb", steps=5, targets=["predicted"]))
    assert (view.kind, view.status, view.queue_position) == ("explain", "queued", 0)
    slow = service.classify(ALICE, png(1), ClassifyParams(model="tiny-rgb", stability=True))
    assert (slow.kind, slow.queue_position) == ("classify", 1)  # on the explain queue, behind it
    assert queue_depth(conn, JobKind.EXPLAIN) == 2 and queue_depth(conn, JobKind.CLASSIFY) == 0


def test_a_queued_job_is_cancelled_at_once_and_its_upload_deleted(conn, make_service, worker):
    service = make_service()
    job_id = service.classify(ALICE, png(), ClassifyParams(model="tiny-rgb")).id
    with pytest.raises(UnknownJobError):
        service.cancel(BOB, job_id)
    view = service.cancel(ALICE, job_id)
    assert view.status == "cancelled" and view.error.code == "job_cancelled"
    assert uploads(conn) == [] and queue_depth(conn, JobKind.CLASSIFY) == 0
    assert service.cancel(ALICE, job_id).status == "cancelled"  # over: left as it is


def test_a_finished_job_is_shown_and_answers_the_same_request_of_its_principal_only(
    conn, make_service, worker, computed
):
    service = make_service()
    params = ClassifyParams(model="tiny-rgb", top_k=3)
    job_id = service.classify(ALICE, png(5), params).id
    assert finish_next(conn, JobKind.CLASSIFY, computed) == job_id
    done = service.view(ALICE, job_id)
    assert done.status == "finished" and done.queue_position is None
    assert done.result == computed == done.typed().result.model_dump(mode="json")
    with pytest.raises(UnknownJobError, match="has no image"):
        service.image(ALICE, job_id, "gradcam.png")  # a classify has none
    with pytest.raises(UnknownJobError, match="has no DICOM object"):
        service.dicom(ALICE, job_id, "../x.dcm")
    again = service.classify(ALICE, png(5), params)
    assert again.id != job_id and again.status == "finished"
    assert again.result == {**computed, "reused": True}
    assert queue_depth(conn, JobKind.CLASSIFY) == 0
    assert job_id not in again.model_dump_json()  # the job it copies is never named
    # Other parameters, or another principal: a new job.
    assert service.classify(ALICE, png(5), ClassifyParams(model="tiny-rgb", top_k=4)).status == "queued"
    assert service.classify(BOB, png(5), params).status == "queued"
    # With reuse off, the same request is computed again.
    assert make_service(reuse_results=False).classify(ALICE, png(5), params).status == "queued"


def test_a_job_is_written_under_what_the_lookup_would_read_and_read_again_when_that_moved(conn, make_service, worker):
    """Once the service knows the store's epoch, a submission writes its job in one step under
    what its lookup would have read (no earlier result, the queue below its depth, the epoch,
    the API keys' revision of a cached principal), checked where it is written. When one moved
    nothing is written by that step and the lookup decides: a new epoch (Redis emptied and
    refilled) is the one the new job's id carries; changed keys look the principal up again,
    and a key refused there writes nothing, its pending audit record neither."""
    from jobs.epoch import EPOCH_DIGITS
    from jobs.keys import api_keys_revision_key, store_epoch_key
    from service.auth.guard import Acting

    service = make_service()
    first = service.classify(ALICE, png(1), ClassifyParams(model="tiny-rgb"))
    assert service.epoch == first.id[:EPOCH_DIGITS]
    conn.set(store_epoch_key(), "f" * EPOCH_DIGITS)
    moved = service.classify(ALICE, png(2), ClassifyParams(model="tiny-rgb"))
    assert moved.id[:EPOCH_DIGITS] == "f" * EPOCH_DIGITS == service.epoch
    assert queue_depth(conn, JobKind.CLASSIFY) == 2 and len(uploads(conn)) == 2

    conn.set(api_keys_revision_key(), "7")
    looked_up: list[str] = []

    def keys_changed(principal: Principal | None):
        looked_up.append("again")
        if principal is None:
            raise UnknownJobError("stands for the 401 of a revoked key")
        return principal

    def acting(principal: Principal | None) -> Acting:
        return Acting("7", ["SET", "aex:test-pending", "audit"], lambda: keys_changed(principal), lambda r: r == "7")

    held = service.classify(BOB, png(3), ClassifyParams(model="tiny-rgb"), acting(BOB))
    assert looked_up == [] and held.status == "queued" and conn.get("aex:test-pending") == b"audit"
    conn.delete("aex:test-pending")
    conn.set(api_keys_revision_key(), "8")  # a key created or revoked elsewhere
    again = service.classify(BOB, png(4), ClassifyParams(model="tiny-rgb"), acting(BOB))
    assert looked_up == ["again"] and again.status == "queued" and conn.get("aex:test-pending") == b"audit"
    conn.delete("aex:test-pending")
    with pytest.raises(UnknownJobError, match="revoked"):
        service.classify(BOB, png(5), ClassifyParams(model="tiny-rgb"), acting(None))
    assert queue_depth(conn, JobKind.CLASSIFY) == 4 and len(uploads(conn)) == 4
    assert not conn.exists("aex:test-pending")
