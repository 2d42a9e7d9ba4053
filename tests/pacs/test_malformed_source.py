"""A DICOM source with malformed patient, study and equipment attributes through the whole
service: uploaded to the API, and by reference from a real Orthanc with the results stored
back into its study. Every DICOM object is made and accepted by dciodvfy, the job names each
malformed attribute, and the PHI canary written into the values is in no job view, log or
error (real Redis, API, worker process and Orthanc; marker e2e)."""

from __future__ import annotations

import io
import json
import logging
import time
import warnings

import pydicom
import pytest

from tests.pacs.test_by_reference import PM_CLASS, SR_CLASS, instance_file
from tests.support.dciodvfy import check_with_dciodvfy, require_dciodvfy
from tests.support.malformed import CANARY, EVERYTHING, malformed, source_file

pytestmark = pytest.mark.e2e

CANARY_PIECE = CANARY[:8]  # the shortest piece of it a malformed value holds (a birth date)
# What a PACS indexes the source by stays valid, so the outputs join the source's own study:
# every malformed attribute of the cases but the UIDs.
BY_REFERENCE = {k: v for k, v in EVERYTHING.items() if not k.endswith("UID")}


@pytest.fixture(scope="module")
def stack(orthanc, tmp_path_factory, settings_on, worker_process, serve_api):
    """(settings, API URL, worker): an API (uvicorn) and one worker of their own that know the
    Orthanc as "orthanc"; the worker's log is read by the tests."""
    from aex.embedded_redis import EmbeddedRedis
    from tests.support.stack import wait_for_workers

    folder = tmp_path_factory.mktemp("malformed-source")
    server = EmbeddedRedis(folder / "redis")
    server.start()
    settings = settings_on(server, 0, pacs={"orthanc": orthanc.endpoint()})
    worker = worker_process(settings, folder / "worker.log")
    try:
        wait_for_workers(settings, 1, [worker])
        yield settings, serve_api(settings), worker
    finally:
        worker.stop(timeout=30)
        server.stop()


def submit(stack, files=None, **fields):
    """(the submission's response, the job's final view) of an explain job."""
    import httpx

    from tests.support.tokens import bearer, token_for

    settings, url, _worker = stack
    headers = bearer(token_for(settings))
    form = {"model": "tiny-grey", "targets": "predicted", "steps": "5", **fields}
    parts = {k: (None, str(v)) for k, v in form.items()} | (files or {})
    resp = httpx.post(f"{url}/v1/explain", files=parts, headers=headers, timeout=60)
    assert resp.status_code == 202, resp.text
    job_url = f"{url}{resp.json()['url']}"
    deadline = time.monotonic() + 180
    while True:
        view = httpx.get(job_url, headers=headers, timeout=30).json()
        if view["status"] in ("finished", "failed", "cancelled") or time.monotonic() > deadline:
            return resp, view
        time.sleep(0.2)


def dicom_objects(stack, view) -> dict[str, bytes]:
    """The job's DICOM objects as the API serves them, by name."""
    import httpx

    from tests.support.tokens import bearer, token_for

    settings, url, _worker = stack
    headers = bearer(token_for(settings))
    out = {}
    for name, link in view["dicom"].items():
        resp = httpx.get(f"{url}{link}", headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        out[name] = resp.content
    return out


def assert_no_canary(stack, view, caplog) -> None:
    """The canary is in no job view, no log of the API process and no log of the worker."""
    _settings, _url, worker = stack
    assert CANARY_PIECE not in json.dumps(view)
    assert CANARY_PIECE not in caplog.text
    assert CANARY_PIECE not in worker.log()


def test_an_upload_with_every_malformed_attribute_has_every_object(stack, tmp_path, caplog):
    require_dciodvfy()
    caplog.set_level(logging.DEBUG)
    data = malformed(source_file(), [(k, raw, vr) for k, (raw, vr) in EVERYTHING.items()])
    _resp, view = submit(stack, files={"image": ("source.dcm", data, "application/dicom")})
    assert view["status"] == "finished", view
    result = view["result"]
    assert "dicom_error" not in result
    assert sorted(w.split(" ", 1)[0] for w in result["dicom_warnings"]) == sorted(EVERYTHING)
    objects = dicom_objects(stack, view)
    assert set(objects) == set(result["dicom_files"]) and len(objects) == 6  # PM, 3 SCs, PDF, SR
    assert not [n for n, blob in objects.items() if CANARY_PIECE.encode() in blob]
    assert check_with_dciodvfy(tmp_path, objects) == {}
    assert_no_canary(stack, view, caplog)


def test_by_reference_the_results_are_stored_back_into_the_source_study(orthanc, stack, tmp_path, caplog):
    from pacs.read import search_instances

    require_dciodvfy()
    caplog.set_level(logging.DEBUG)
    data = malformed(source_file(seed=2), [(k, raw, vr) for k, (raw, vr) in BY_REFERENCE.items()])
    orthanc.store(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's, about the malformed values on purpose
        source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    uids = {
        "study_uid": source.StudyInstanceUID,
        "series_uid": source.SeriesInstanceUID,
        "instance_uid": source.SOPInstanceUID,
    }
    _resp, view = submit(stack, pacs="orthanc", **uids)
    assert view["status"] == "finished", view
    result = view["result"]
    assert sorted(w.split(" ", 1)[0] for w in result["dicom_warnings"]) == sorted(BY_REFERENCE)
    stored = result["stored"]
    assert stored["pacs"] == "orthanc" and stored["failed"] == 0 and stored["stored"] == 6, stored

    settings, _url, _worker = stack
    found = [
        row
        for row in search_instances(settings.pacs, "orthanc", source.StudyInstanceUID)
        if row["instance_uid"] != source.SOPInstanceUID
    ]
    assert {PM_CLASS, SR_CLASS} <= {row["sop_class_uid"] for row in found}, found
    back = {row["instance_uid"]: instance_file(orthanc, row["instance_uid"]) for row in found}
    assert len(back) == 6 and not [u for u, blob in back.items() if CANARY_PIECE.encode() in blob]
    assert check_with_dciodvfy(tmp_path, {f"{u}.dcm": blob for u, blob in back.items()}) == {}
    pm = pydicom.dcmread(io.BytesIO(next(back[r["instance_uid"]] for r in found if r["sop_class_uid"] == PM_CLASS)))
    assert pm.StudyInstanceUID == source.StudyInstanceUID and pm.PatientSex == "" and "PatientAge" not in pm
    assert_no_canary(stack, view, caplog)
