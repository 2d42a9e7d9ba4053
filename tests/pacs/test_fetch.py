"""Fetching by reference from a real Orthanc (WADO-RS): the bytes as stored, the size limit, the typed errors, bounded retries."""

from __future__ import annotations

import http.server
import io
import threading
import time

import pydicom
import pytest

from jobs.settings import Settings
from models.errors import (
    BadParameterError,
    InstanceNotFoundError,
    PacsError,
    PacsUnreachableError,
    UnknownPacsError,
    UploadTooLargeError,
)
from pacs.read import check_reference, fetch_instance, single_part

LIMIT = Settings().max_upload_bytes  # AEX_MAX_UPLOAD_BYTES by default


def uids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"])
def test_a_pydicom_file_comes_back_as_stored(orthanc, pacs_settings, pydicom_file, name):
    data = pydicom_file(name)
    orthanc.store(data)
    fetched = fetch_instance(pacs_settings().pacs, "orthanc", *uids(data), max_bytes=LIMIT)
    assert fetched == data


def test_pneumonia_xrays_at_512_and_larger_come_back_whole(orthanc, pacs_settings, pneumonia_xrays):
    for size in ((512, 512), (768, 640)):
        (data,) = pneumonia_xrays(1, size=size)
        orthanc.store(data)
        fetched = fetch_instance(pacs_settings().pacs, "orthanc", *uids(data), max_bytes=LIMIT)
        ds = pydicom.dcmread(io.BytesIO(fetched))
        assert (ds.Rows, ds.Columns, ds.BitsStored) == (*size, 16)
        assert fetched == data


def test_a_missing_instance_is_instance_not_found_with_its_uids(orthanc, pacs_settings, pydicom_file):
    study, series, _ = uids(pydicom_file("CT_small.dcm"))
    orthanc.store(pydicom_file("CT_small.dcm"))
    with pytest.raises(InstanceNotFoundError) as info:
        fetch_instance(pacs_settings().pacs, "orthanc", study, series, "1.2.3.4.5.6", max_bytes=LIMIT)
    assert "1.2.3.4.5.6" in info.value.message and study in info.value.message
    assert orthanc.rest not in info.value.message  # the PACS by name, never its address


def test_an_instance_past_the_upload_limit_is_refused_while_streaming(orthanc, pacs_settings, pneumonia_xrays):
    (data,) = pneumonia_xrays(1, size=(512, 512), start=3)
    orthanc.store(data)
    with pytest.raises(UploadTooLargeError):
        fetch_instance(pacs_settings().pacs, "orthanc", *uids(data), max_bytes=100_000)


def test_unknown_pacs_and_bad_uids_are_refused_before_any_request(pacs_settings):
    settings = pacs_settings()
    with pytest.raises(UnknownPacsError) as info:
        check_reference(settings.pacs, "http://10.0.0.1/dicom-web", "1.2", "1.2.3", "1.2.3.4")
    assert "orthanc" in info.value.message  # the names configured
    for bad in ("1.2.03", "1..2", "x.1", "1.2.3." + "4" * 64, "", "1"):
        with pytest.raises(BadParameterError):
            check_reference(settings.pacs, "orthanc", bad, "1.2.3", "1.2.3.4")
    ref = check_reference(settings.pacs, "orthanc", "1.2", "1.2.3", "1.2.3.4")
    assert ref.as_dict() == {"pacs": "orthanc", "study_uid": "1.2", "series_uid": "1.2.3", "instance_uid": "1.2.3.4"}


def test_a_dimse_only_pacs_cannot_be_read():
    settings = Settings(pacs={"scp": {"dimse": {"ae_title": "SCP", "host": "127.0.0.1", "port": 104}}})
    with pytest.raises(BadParameterError, match="C-STORE only"):
        check_reference(settings.pacs, "scp", "1.2", "1.2.3", "1.2.3.4")


def test_wrong_credentials_are_a_pacs_error_not_retried(orthanc, pacs_settings, pydicom_file):
    data = pydicom_file("CT_small.dcm")
    orthanc.store(data)
    started = time.monotonic()
    with pytest.raises(PacsError) as info:
        fetch_instance(pacs_settings({"password": "wrong"}).pacs, "orthanc", *uids(data), max_bytes=LIMIT, backoff=1.0)
    assert info.value.code == "pacs_error" and "401" in info.value.message
    assert "wrong" not in info.value.message
    assert time.monotonic() - started < 1.0  # no retry


def test_an_unreachable_pacs_fails_after_bounded_retries():
    from tests.support.servers import free_port

    settings = Settings(pacs={"gone": {"url": f"http://127.0.0.1:{free_port()}/dicom-web", "timeout": 2}})
    started = time.monotonic()
    with pytest.raises(PacsUnreachableError) as info:
        fetch_instance(settings.pacs, "gone", "1.2", "1.2.3", "1.2.3.4", max_bytes=LIMIT, attempts=3, backoff=0.1)
    assert info.value.code == "pacs_unreachable" and "3 attempts" in info.value.message
    assert 0.3 <= time.monotonic() - started < 10  # paused 0.1 + 0.2 s between the attempts


class FlakyPacs(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` requests, then one DICOM part."""

    failures = 2
    calls = 0
    refuse_any_syntax = False
    body = b""

    def do_GET(self):
        type(self).calls += 1
        if self.refuse_any_syntax and "transfer-syntax=*" in self.headers.get("Accept", ""):
            self.send_response(406)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if type(self).calls <= self.failures:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + self.body + b"\r\n--b1--\r\n"
        self.send_response(200)
        self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b1')
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_args):
        pass


def test_5xx_answers_are_retried_then_the_instance_comes(pydicom_file):
    FlakyPacs.body, FlakyPacs.calls = pydicom_file("CT_small.dcm"), 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyPacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = Settings(pacs={"flaky": {"url": f"http://127.0.0.1:{server.server_address[1]}/dicom-web"}})
        data = fetch_instance(
            settings.pacs, "flaky", "1.2", "1.2.3", "1.2.3.4", max_bytes=LIMIT, attempts=3, backoff=0.05
        )
        assert data == FlakyPacs.body and FlakyPacs.calls == 3
    finally:
        server.shutdown()


def test_multipart_answers_are_read_strictly():
    assert single_part("application/dicom", b"DICM", "p") == b"DICM"
    two = b"--x\r\n\r\nA\r\n--x\r\n\r\nB\r\n--x--\r\n"
    with pytest.raises(PacsError, match="2 parts"):
        single_part('multipart/related; boundary="x"', two, "p")
    with pytest.raises(PacsError):
        single_part("text/html", b"<html>", "p")


def test_a_pacs_that_cannot_send_any_syntax_is_asked_for_its_default(pydicom_file):
    FlakyPacs.body, FlakyPacs.calls, FlakyPacs.failures, FlakyPacs.refuse_any_syntax = (
        pydicom_file("MR_small.dcm"),
        0,
        0,
        True,
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyPacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = Settings(pacs={"old": {"url": f"http://127.0.0.1:{server.server_address[1]}/rs"}})
        assert fetch_instance(settings.pacs, "old", "1.2", "1.2.3", "1.2.3.4", max_bytes=LIMIT) == FlakyPacs.body
        assert FlakyPacs.calls == 2
    finally:
        server.shutdown()
        FlakyPacs.failures, FlakyPacs.refuse_any_syntax = 2, False
