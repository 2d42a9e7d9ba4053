"""Exact objects through a real Orthanc: a DX explained by reference twice (result reuse off) gives byte-identical objects, which Orthanc holds, without an empty Laterality."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pydicom
import pytest

from tests.pacs.test_by_reference import explain, instance_file
from tests.support.dciodvfy import check_with_dciodvfy, require_dciodvfy
from tests.support.dicom import xray

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(orthanc, tmp_path_factory, settings_on, worker_process, serve_api):
    """An API and one worker that know the Orthanc as "orthanc", result reuse off: the same
    request twice is computed twice."""
    from aex.embedded_redis import EmbeddedRedis
    from tests.support.stack import wait_for_workers

    folder = tmp_path_factory.mktemp("exact")
    server = EmbeddedRedis(folder / "redis")
    server.start()
    settings = settings_on(server, 0, pacs={"orthanc": orthanc.endpoint()}, reuse_results=False, log_level="INFO")
    worker = worker_process(settings, folder / "worker.log")
    try:
        wait_for_workers(settings, 1, [worker])
        yield settings, serve_api(settings), worker
    finally:
        worker.stop(timeout=30)
        server.stop()


def job_objects(stack, view) -> dict[str, bytes]:
    """Every DICOM object of a finished job, as the API serves it, by name."""
    from tests.support.tokens import bearer, token_for

    settings, url, _worker = stack
    headers = bearer(token_for(settings))
    out = {}
    for name in view["result"]["dicom_files"]:
        resp = httpx.get(f"{url}{view['url']}/dicom/{name}", headers=headers, timeout=30)
        resp.raise_for_status()
        out[name] = resp.content
    return out


def test_a_dx_explained_twice_by_reference_gives_the_same_bytes(orthanc, stack, tmp_path):
    require_dciodvfy()
    yy, xx = np.mgrid[0:300, 0:240]
    ds = pydicom.dcmread(io.BytesIO(xray(((xx * 9 + yy * 5) % 4096).astype(np.uint16))))
    ds.PatientOrientation, ds.ImageLaterality = ["L", "F"], "L"
    ds.ContentDate, ds.ContentTime = "20240301", "083000"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    orthanc.store(buf.getvalue())
    uids = {"study_uid": ds.StudyInstanceUID, "series_uid": ds.SeriesInstanceUID, "instance_uid": ds.SOPInstanceUID}

    _, first = explain(stack[:2], pacs="orthanc", **uids)
    assert first["status"] == "finished", first
    time.sleep(1.5)  # the clock's second differs between the runs
    _, second = explain(stack[:2], pacs="orthanc", **uids)
    assert second["status"] == "finished", second
    assert second["id"] != first["id"] and not second["result"]["reused"]  # computed again, not reused
    a, b = job_objects(stack, first), job_objects(stack, second)
    assert len(a) >= 5 and set(a) == set(b)
    assert {"report_pdf.dcm", "structured_report.dcm"} <= set(a)  # the PDF report is one of them
    for name in a:
        assert a[name] == b[name], name
    assert second["result"]["stored"] == {**first["result"]["stored"]}
    # Orthanc holds what aex wrote, byte for byte.
    for listing in first["result"]["dicom_objects"]:
        assert instance_file(orthanc, listing["sop_instance_uid"]) == a[listing["name"]], listing["name"]
    for name, data in a.items():  # a chest (unpaired): no Laterality, not even an empty one
        assert "Laterality" not in pydicom.dcmread(io.BytesIO(data)), name
    assert check_with_dciodvfy(tmp_path, a) == {}
    # Each stored result set is logged by the worker with its counts and the PACS's name only.
    n = len(a)
    assert stack[2].log().count(f"stored {n} objects (0 failed) to orthanc via stow") == 2
