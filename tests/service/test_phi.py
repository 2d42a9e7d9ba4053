"""PHI stays where it belongs (issue 10's check): a DICOM file whose PatientName carries a marker
and whose PatientBirthDate is malformed, classified and explained through the service (its own
Redis database and worker, logging at INFO): the marker is in no API or worker log line, no job
JSON, no metric and no Redis value outside the encrypted blobs (every key of the database
scanned, compressed and base64 values opened); the upload waits sealed; the DICOM outputs,
once decrypted, do carry the patient's name, as they must (marker e2e)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import time
import zlib

import numpy as np
import pydicom
import pytest

from jobs.crypto import MAGIC
from jobs.keys import dicom_key, images_key, upload_key
from jobs.queues import connect
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e

DB = 1  # no other test uses it
MARKER = b"AEXMARKER"
PATIENT_NAME = "AEXMARKER^PATIENT"
BAD_BIRTH_DATE = "AEXMARKER-31/02"  # not a DA value: any parser that quotes it would leak the marker


def marked_dicom(write_dicom) -> bytes:
    yy, xx = np.mgrid[0:48, 0:40]
    source = write_dicom((xx * 60 + yy * 25).astype(np.uint16), "MONOCHROME2", window=(1800.0, 3600.0))
    ds = pydicom.dcmread(io.BytesIO(source))
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "AEXMARKER-ID"
    with pydicom.config.disable_value_validation():
        ds.PatientBirthDate = BAD_BIRTH_DATE
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def openings(value: bytes, depth: int = 0) -> list[bytes]:
    """``value`` and what it holds encoded: zlib (rq's job data), base64 (rq's results), JSON
    strings of those; a blob sealed by aex is left whole (its plain text is checked apart)."""
    out = [value]
    if value.startswith(MAGIC) or depth > 2:
        return out
    with contextlib.suppress(zlib.error):
        out += openings(zlib.decompress(value), depth + 1)
    for chunk in value.replace(b'"', b" ").split():
        if len(chunk) >= 16:
            with contextlib.suppress(binascii.Error, ValueError):
                out += openings(base64.b64decode(chunk, validate=True), depth + 1)
    return out


def every_value(conn) -> list[tuple[bytes, bytes]]:
    """(key, value) of every key of the database, whatever its type (names and members too)."""
    pairs: list[tuple[bytes, bytes]] = []
    for key in conn.scan_iter(count=1000):
        kind = conn.type(key)
        values: list[bytes] = [key]
        if kind == b"string":
            values.append(conn.get(key))
        elif kind == b"hash":
            values += [b for item in conn.hgetall(key).items() for b in item]
        elif kind == b"list":
            values += conn.lrange(key, 0, -1)
        elif kind == b"set":
            values += list(conn.smembers(key))
        elif kind == b"zset":
            values += [m for m, _ in conn.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            values += [b for _, fields in conn.xrange(key) for item in fields.items() for b in item]
        else:
            raise AssertionError(f"a Redis value of a type this scan does not read: {key!r} {kind!r}")
        pairs += [(key, v) for v in values if v is not None]
    return pairs


def test_patient_data_reaches_no_log_json_metric_or_redis_value(settings_for, start_workers, dicom_file, caplog):
    settings = settings_for(DB, log_level="INFO", classify_wait_seconds=0.0)
    conn = connect(settings.redis_url)
    conn.flushdb()
    (worker,) = start_workers(settings, 1)
    scan = marked_dicom(dicom_file)
    assert MARKER in scan
    caplog.set_level(logging.DEBUG)
    with api_client(settings) as client:
        # The worker busy on a long job: the marked upload waits in Redis, where it is sealed.
        busy = client.post(
            "/v1/explain",
            files={
                "image": ("busy.dcm", dicom_file(np.full((30, 30), 900, np.uint16), "MONOCHROME2"), "application/dicom")
            },
            data={"model": "tiny-grey", "targets": "predicted", "steps": "100000"},
        )
        assert busy.status_code == 202, busy.text
        resp = client.post(
            "/v1/explain",
            files={"image": ("scan.dcm", scan, "application/dicom")},
            data={"model": "tiny-grey", "targets": "predicted,runner-up", "steps": "3"},
        )
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        waiting = conn.get(upload_key(job_id))
        assert waiting is not None and waiting.startswith(MAGIC) and MARKER not in waiting
        classified = client.post(
            "/v1/classify", files={"image": ("scan.dcm", scan, "application/dicom")}, data={"model": "tiny-grey"}
        )
        assert classified.status_code == 202, classified.text
        client.delete(busy.headers["location"])

        views = []
        for url in (resp.headers["location"], classified.headers["location"]):
            deadline = time.monotonic() + 180
            while (view := client.get(url)).json()["status"] not in ("finished", "failed", "cancelled"):
                assert time.monotonic() < deadline, view.text
                time.sleep(0.05)
            assert view.json()["status"] == "finished", view.text
            views.append(view)
        explained = views[0].json()
        assert explained["dicom"], explained  # the DICOM objects were derived
        # Once decrypted (by the API), the DICOM outputs carry the patient's name, as they must.
        for url in explained["dicom"].values():
            out = client.get(url)
            assert out.status_code == 200
            derived = pydicom.dcmread(io.BytesIO(out.content))
            assert str(derived.PatientName) == PATIENT_NAME and MARKER in out.content
        for url in explained["images"].values():
            assert client.get(url).status_code == 200
        metrics = client.get("/metrics").text
        audit = client.get("/v1/audit", params={"since": "1h"}).text

    # No job JSON, metric or audit record holds it.
    for text in [v.text for v in views] + [resp.text, classified.text, metrics, audit]:
        assert MARKER.decode() not in text
    # No log line: the API's (every logger, DEBUG) and the worker's (INFO, rq's included).
    assert MARKER.decode() not in caplog.text
    assert MARKER.decode() not in worker.log(), worker.log()[-3000:]
    # No Redis value outside the sealed blobs; the outputs are sealed blobs, per field.
    leaks = [(key, value[:120]) for key, value in every_value(conn) for v in openings(value) if MARKER in v]
    assert not leaks, leaks
    for redis_key in (images_key(job_id), dicom_key(job_id)):
        stored = conn.hgetall(redis_key)
        assert stored and all(blob.startswith(MAGIC) for blob in stored.values()), redis_key
    conn.flushdb()
    conn.close()
