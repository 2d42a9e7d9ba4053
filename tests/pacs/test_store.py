"""Storing result objects back: STOW-RS into a real Orthanc (found again by QIDO-RS in the source's study, never duplicated), C-STORE to a pynetdicom SCP and to Orthanc."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from jobs.settings import Settings
from models.errors import PacsError, PacsUnreachableError
from pacs.read import search_instances
from pacs.store import store_results


def result_objects(source: bytes, n: int = 2) -> list[bytes]:
    """Secondary Captures derived from ``source`` (a new series in its study), as aex makes them."""
    from models.dicom.secondary_capture import secondary_captures

    ds = pydicom.dcmread(io.BytesIO(source))
    rng = np.random.default_rng(0)
    images = [(f"img{i}", rng.random((32, 32))) for i in range(n)]
    return [data for _name, data in secondary_captures(ds, images, "tests: derived")]


def uid_of(data: bytes, keyword: str) -> str:
    return str(getattr(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True), keyword))


def test_stow_stores_in_the_source_study_and_qido_finds_them(orthanc, pacs_settings, pneumonia_xrays):
    (source,) = pneumonia_xrays(1, size=(512, 512), start=10)
    orthanc.store(source)
    objects = result_objects(source)
    settings = pacs_settings()
    report = store_results(settings.pacs, "orthanc", objects)
    assert report["pacs"] == "orthanc" and report["via"] == "stow"
    assert (report["stored"], report["failed"]) == (2, 0)
    assert [r["sop_instance_uid"] for r in report["objects"]] == [uid_of(o, "SOPInstanceUID") for o in objects]
    assert all(r["status"] == "stored" for r in report["objects"])
    study = uid_of(source, "StudyInstanceUID")
    found = {row["instance_uid"]: row for row in search_instances(settings.pacs, "orthanc", study)}
    assert set(found) == {uid_of(source, "SOPInstanceUID"), *(r["sop_instance_uid"] for r in report["objects"])}
    for row in report["objects"]:
        assert found[row["sop_instance_uid"]]["series_uid"] == row["series_uid"] != uid_of(source, "SeriesInstanceUID")
        assert found[row["sop_instance_uid"]]["manufacturer"] == "aex"


def test_storing_the_same_objects_again_duplicates_nothing(orthanc, pacs_settings, pneumonia_xrays):
    (source,) = pneumonia_xrays(1, size=(512, 512), start=11)
    orthanc.store(source)
    objects = result_objects(source, n=1)
    settings = pacs_settings()
    first = store_results(settings.pacs, "orthanc", objects)
    again = store_results(settings.pacs, "orthanc", objects)
    assert first["stored"] == again["stored"] == 1 and again["failed"] == 0
    study = uid_of(source, "StudyInstanceUID")
    assert len(search_instances(settings.pacs, "orthanc", study)) == 2  # the source and one result
    stats = orthanc.request("GET", f"/studies/{orthanc_study_id(orthanc, study)}/statistics")
    assert int(stats["CountInstances"]) == 2


def orthanc_study_id(orthanc, study_uid: str) -> str:
    (found,) = orthanc.request("POST", "/tools/lookup", content=study_uid.encode())
    return found["ID"]


def test_c_store_to_a_pynetdicom_scp(storage_scp, pneumonia_xrays):
    (source,) = pneumonia_xrays(1, size=(512, 512), start=12)
    objects = result_objects(source)
    entry = {"dimse": {"ae_title": storage_scp.ae_title, "host": "127.0.0.1", "port": storage_scp.port}}
    settings = Settings(pacs={"scp": entry})
    report = store_results(settings.pacs, "scp", objects)
    assert report["via"] == "dimse" and (report["stored"], report["failed"]) == (2, 0)
    received = {str(ds.SOPInstanceUID): ds for ds in storage_scp.received}
    assert set(received) == {uid_of(o, "SOPInstanceUID") for o in objects}
    for ds in received.values():
        assert str(ds.StudyInstanceUID) == uid_of(source, "StudyInstanceUID")
        assert ds.pixel_array.shape == (32, 32, 3)


def test_c_store_to_orthanc_when_asked_to(orthanc, pacs_settings, pneumonia_xrays):
    (source,) = pneumonia_xrays(1, size=(512, 512), start=13)
    orthanc.store(source)
    objects = result_objects(source, n=1)
    settings = pacs_settings({"store_via": "dimse"})
    report = store_results(settings.pacs, "orthanc", objects)
    assert report["via"] == "dimse" and report["stored"] == 1
    report = store_results(settings.pacs, "orthanc", objects)  # the same UID again: accepted, kept once
    assert report["stored"] == 1
    assert len(search_instances(settings.pacs, "orthanc", uid_of(source, "StudyInstanceUID"))) == 2


def test_a_peer_that_is_down_is_unreachable_after_retries(pneumonia_xrays):
    from tests.support.servers import free_port

    (source,) = pneumonia_xrays(1, size=(512, 512), start=14)
    objects = result_objects(source, n=1)
    for entry in (
        {"url": f"http://127.0.0.1:{free_port()}/dicom-web", "timeout": 2},
        {"dimse": {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}, "timeout": 2},
    ):
        with pytest.raises(PacsUnreachableError):
            store_results(Settings(pacs={"down": entry}).pacs, "down", objects, attempts=2, backoff=0.05)


def test_a_refused_association_is_a_pacs_error(storage_scp, pneumonia_xrays):
    (source,) = pneumonia_xrays(1, size=(512, 512), start=15)
    entry = {"dimse": {"ae_title": storage_scp.ae_title, "host": "127.0.0.1", "port": storage_scp.port}}
    storage_scp.server.ae.require_called_aet = True
    entry["dimse"]["ae_title"] = "SOMEONEELSE"
    with pytest.raises(PacsError, match="rejected"):
        store_results(Settings(pacs={"scp": entry}).pacs, "scp", result_objects(source, n=1), attempts=1)


def test_a_jobs_store_report_keeps_the_error_instead_of_raising(pneumonia_xrays):
    from pacs.store import store_report
    from tests.support.servers import free_port

    (source,) = pneumonia_xrays(1, size=(512, 512), start=16)
    settings = Settings(pacs={"down": {"url": f"http://127.0.0.1:{free_port()}/dicom-web", "timeout": 1}})
    report = store_report(settings.pacs, "down", result_objects(source, n=1))
    assert report["error"]["code"] == "pacs_unreachable" and report["stored"] == 0 and report["failed"] == 1


def test_each_store_is_logged_with_its_counts_and_the_pacs_name_only(orthanc, pacs_settings, pneumonia_xrays, caplog):
    import logging

    from pacs.store import store_report

    (source,) = pneumonia_xrays(1, size=(64, 64), start=14)
    orthanc.store(source)
    objects = result_objects(source, n=3)
    settings = pacs_settings()
    with caplog.at_level(logging.INFO, logger="aex.pacs"):
        store_results(settings.pacs, "orthanc", objects)
        store_report(settings.pacs, "orthanc", [b"not DICOM"])  # refused: logged, not raised
    lines = [r.getMessage() for r in caplog.records if r.name == "aex.pacs"]
    assert lines == [
        "stored 3 objects (0 failed) to orthanc via stow",
        "stored 0 objects (1 failed) to orthanc: [bad_parameter]",
    ]
    text = "\n".join(lines)
    # No address, no UID, no patient attribute.
    assert orthanc.rest.split("//")[1] not in text and uid_of(source, "StudyInstanceUID") not in text
    assert all(uid_of(o, "SOPInstanceUID") not in text for o in objects) and "PX-PACS" not in text
