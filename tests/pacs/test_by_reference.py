"""Input by reference through the API: the worker fetches the instance from a real Orthanc by
WADO-RS, explains it, and stores the Parametric Map, the Secondary Captures and the SR back
into the source's study by STOW-RS; a PACS that is not configured, or an instance it does not
hold, is a precise error."""

from __future__ import annotations

import io
import time

import pydicom
import pytest

pytestmark = pytest.mark.e2e

PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage


@pytest.fixture(scope="module")
def stack(orthanc, tmp_path_factory, settings_on, worker_process, serve_api):
    """An API (uvicorn) and one worker of their own that know the Orthanc as "orthanc"."""
    from aex.embedded_redis import EmbeddedRedis
    from tests.support.stack import wait_for_workers

    folder = tmp_path_factory.mktemp("by-reference")
    server = EmbeddedRedis(folder / "redis")
    server.start()
    settings = settings_on(server, 0, pacs={"orthanc": orthanc.endpoint()})
    worker = worker_process(settings, folder / "worker.log")
    try:
        wait_for_workers(settings, 1, [worker])
        yield settings, serve_api(settings)
    finally:
        worker.stop(timeout=30)
        server.stop()


def instance_file(orthanc, sop_instance_uid: str) -> bytes:
    """The Part 10 file Orthanc holds for ``sop_instance_uid`` (REST: lookup, then the file)."""
    import httpx

    from tests.support.orthanc import ORTHANC_PASSWORD, ORTHANC_USER

    (hit,) = [h for h in orthanc.request("POST", "/tools/lookup", content=sop_instance_uid) if h["Type"] == "Instance"]
    resp = httpx.get(f"{orthanc.rest}/instances/{hit['ID']}/file", auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=30)
    resp.raise_for_status()
    return resp.content


def explain(stack, **fields):
    import httpx

    from tests.support.tokens import bearer, token_for

    settings, url = stack
    headers = bearer(token_for(settings))
    form = {"model": "tiny-grey", "targets": "predicted", "steps": "5", **fields}
    # A multipart form without a file part: httpx sends multipart only with files, so the
    # fields travel as form parts of their own.
    files = {k: (None, str(v)) for k, v in form.items()}
    resp = httpx.post(f"{url}/v1/explain", files=files, headers=headers, timeout=60)
    if resp.status_code not in (200, 202):
        return resp, None
    job_url = f"{url}{resp.json()['url']}"
    deadline = time.monotonic() + 180
    while True:
        view = httpx.get(job_url, headers=headers, timeout=30).json()
        if view["status"] in ("finished", "failed", "cancelled") or time.monotonic() > deadline:
            return resp, view
        time.sleep(0.2)


def test_an_instance_in_the_pacs_is_explained_and_its_results_stored_back(orthanc, stack, pneumonia_xrays):
    from pacs.read import search_instances

    (data,) = pneumonia_xrays(1, size=(512, 640), start=70)
    orthanc.store(data)
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    uids = {
        "study_uid": source.StudyInstanceUID,
        "series_uid": source.SeriesInstanceUID,
        "instance_uid": source.SOPInstanceUID,
    }
    resp, view = explain(stack, pacs="orthanc", **uids)
    assert resp.status_code == 202, resp.text
    assert view["status"] == "finished", view
    stored = view["result"]["stored"]
    assert stored["pacs"] == "orthanc" and stored["failed"] == 0 and stored["stored"] >= 4, stored
    assert view["result"]["provenance"]["input"]["format"] == "dicom"

    settings, _url = stack
    found = [
        row
        for row in search_instances(settings.pacs, "orthanc", source.StudyInstanceUID)
        if row["instance_uid"] != source.SOPInstanceUID
    ]
    classes = {row["sop_class_uid"] for row in found}
    assert PM_CLASS in classes and SR_CLASS in classes, classes
    assert all(row["manufacturer"] == "aex" for row in found)
    pm_uid = next(row["instance_uid"] for row in found if row["sop_class_uid"] == PM_CLASS)
    pm = pydicom.dcmread(io.BytesIO(instance_file(orthanc, pm_uid)))
    assert (pm.Rows, pm.Columns) == (512, 640)  # the source's own grid

    # The same request again: answered from the result kept (result reuse is on), which names
    # the same objects; nothing is computed or stored twice, no series duplicated.
    resp2, view2 = explain(stack, pacs="orthanc", **uids)
    assert view2["status"] == "finished", view2
    assert view2["result"]["reused"] is True and view2["id"] != view["id"]
    assert view2["result"]["dicom_objects"] == view["result"]["dicom_objects"]
    again = [
        row
        for row in search_instances(settings.pacs, "orthanc", source.StudyInstanceUID)
        if row["instance_uid"] != source.SOPInstanceUID
    ]
    assert len(again) == len(found)


def test_an_unknown_pacs_and_a_missing_instance_are_precise_errors(stack):
    uids = {"study_uid": "1.2.3", "series_uid": "1.2.3.4", "instance_uid": "1.2.3.4.5"}
    resp, _ = explain(stack, pacs="nowhere", **uids)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unknown_pacs", resp.text
    resp, _ = explain(stack, pacs="orthanc", study_uid="1.2.3")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_parameter", resp.text
    resp, view = explain(stack, pacs="orthanc", **uids)
    assert resp.status_code == 202, resp.text
    assert view["status"] == "failed" and view["error"]["code"] == "instance_not_found", view
    assert "1.2.3.4.5" in view["error"]["message"]
