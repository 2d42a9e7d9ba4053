"""The audit trail (service/audit.py) on a real Redis: records and their reader, retention,
fields checked against their shape (nothing a client typed gets in), the middleware's one
record per request, refused ones included, and failing closed: no answer without its record,
no mutating request acting before its record (an ACL user that may not write)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from jobs.keys import audit_key
from jobs.queues import connect
from models.errors import BadParameterError
from service.app import install_error_handlers
from service.audit import AuditLog, note, pending_key, to_json_lines
from service.audit_answer import AuditMiddleware, record_answer
from service.audit_since import parse_since
from service.auth import ApiKeyStore, Authenticator, Principal, Scope, requires

DB = 12
JOB = "0123456789abcdef0123456789abcdef"
SHA = "ab" * 32


def test_records_are_written_and_read_back(conn):
    log = AuditLog(conn, known_models=lambda: {"cifar10-robust"})
    key = Principal("key", "ci", None, frozenset({"submit"}))
    first = log.record(key, "POST /v1/explain", 202, job_id=JOB, model="cifar10-robust", input_sha256=SHA)
    log.record(None, "GET /v1/jobs/{job_id}", 401, job_id=JOB)
    records = log.read()
    assert [r["id"] for r in records][0] == first
    assert records[0] == {
        "id": first,
        "time": records[0]["time"],
        "principal": "key:ci",
        "action": "POST /v1/explain",
        "job_id": JOB,
        "model": "cifar10-robust",
        "input_sha256": SHA,
        "status": 202,
    }
    assert records[1]["principal"] == "anonymous" and records[1]["status"] == 401 and records[1]["model"] is None
    assert datetime.fromisoformat(records[0]["time"]) <= datetime.now(UTC)
    assert log.read(since=first) == records[1:]  # a record id: the records after it
    assert log.read(limit=1) == records[:1]
    assert log.read(since="1h") == records and log.read(until="2h") == []
    lines = to_json_lines(records).splitlines()
    assert [json.loads(line) for line in lines] == records


def test_a_model_name_that_is_not_served_is_recorded_as_unknown(conn):
    """A name a client typed for a model that does not exist may be an identifier: it is never
    recorded, even when it has a model name's shape; a served one is, and no model is none."""
    log = AuditLog(conn, known_models=lambda: {"tiny-rgb"})
    canary = "MRN-4711-Canary"
    log.record("key:ci", "POST /v1/classify", 404, model=canary)
    log.record("key:ci", "POST /v1/classify", 200, model="tiny-rgb")
    log.record("key:ci", "GET /v1/models", 200)
    assert [r["model"] for r in log.read()] == ["unknown", "tiny-rgb", None]
    # No catalogue, or one that cannot be read: no name is known to be served.
    AuditLog(conn).record("key:ci", "POST /v1/classify", 200, model="tiny-rgb")

    def unreadable():
        raise ConnectionError("catalogue away")

    AuditLog(conn, known_models=unreadable).record("key:ci", "POST /v1/classify", 200, model=canary)
    assert [r["model"] for r in log.read()[3:]] == ["unknown", "unknown"]
    assert canary not in str(conn.xrange(audit_key())) and canary not in str(conn.hgetall(pending_key()))


def test_fields_of_another_shape_never_reach_the_trail(conn):
    log = AuditLog(conn)
    log.record(
        "oidc:user-1@ward\n7\x00",
        "GET /v1/jobs/Test^Patient 19700101",
        200,
        job_id="Test^Patient",
        model="../Test^Patient",
        input_sha256="19700101",
    )
    (record,) = log.read()
    assert record["principal"] == "oidc:user-1@ward7"
    assert record["action"] == "unknown" and record["job_id"] is None and record["model"] == "unknown"
    assert record["input_sha256"] is None
    raw = b"".join(v for _, fields in conn.xrange(audit_key()) for v in fields.values())
    assert b"Patient" not in raw and b"19700101" not in raw


def test_old_records_are_trimmed_and_never_read(conn):
    log = AuditLog(conn, retention_seconds=60, max_records=100_000)
    old_ms = int(time.time() * 1000) - 3_600_000
    with conn.pipeline() as pipe:
        for i in range(250):
            pipe.xadd(
                audit_key(), {"time": "old", "principal": "key:x", "action": "x", "status": "200"}, id=f"{old_ms}-{i}"
            )
        pipe.execute()
    log.record("key:x", "GET /v1/models", 200)
    assert conn.xlen(audit_key()) < 251  # trimmed by whole stream nodes (MINID ~)
    assert [r["action"] for r in log.read()] == ["GET /v1/models"]
    assert [r["action"] for r in log.read(since="2h")] == ["GET /v1/models"]
    capped = AuditLog(conn, retention_seconds=86400, max_records=10)
    for _ in range(300):
        capped.record("key:x", "GET /v1/models", 200)
    assert conn.xlen(audit_key()) <= 10 + 100  # MAXLEN ~ trims whole nodes of 100 entries


def test_since_takes_durations_times_and_record_ids():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ms = int(now.timestamp() * 1000)
    assert parse_since("15m", now) == f"{ms - 15 * 60_000}-0"
    assert parse_since("7d", now) == f"{int((now - timedelta(days=7)).timestamp() * 1000)}-0"
    assert parse_since("2026-01-02T03:04:05Z") == f"{ms}-0" == parse_since("2026-01-02T03:04:05")
    assert parse_since("2026-01-02T04:04:05+01:00") == f"{ms}-0"
    assert parse_since("1767323045000-3") == "(1767323045000-3"
    for bad in ["yesterday", "1w", "-5m", "Test^Patient"]:
        with pytest.raises(BadParameterError, match="since/until"):
            parse_since(bad)


@pytest.fixture
def app(conn):
    """A tiny app with the guard and the audit middleware, as the service will have them."""
    app = FastAPI()
    app.state.auth = Authenticator(True, ApiKeyStore(conn), None)
    log = AuditLog(conn, known_models=lambda: {"tiny-rgb"})
    install_error_handlers(app)

    @app.get("/v1/jobs/{job_id}")
    def view(job_id: str, request: Request, principal: Annotated[Principal, requires(Scope.READ)]) -> dict:
        note(request, model="tiny-rgb", input_sha256=SHA)
        return {"id": job_id}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    app.add_middleware(AuditMiddleware, audit=log)
    with TestClient(app) as client:
        yield client, ApiKeyStore(conn), log


def test_the_middleware_writes_one_record_per_request(app):
    client, store, log = app
    _, token = store.create("reader", ["read"])
    _, metrics_only = store.create("prometheus", ["metrics"])
    assert client.get(f"/v1/jobs/{JOB}").status_code == 401
    assert client.get(f"/v1/jobs/{JOB}", headers={"Authorization": "Bearer " + metrics_only}).status_code == 403
    assert client.get(f"/v1/jobs/{JOB}", headers={"Authorization": "Bearer " + token}).status_code == 200
    assert client.get("/v1/jobs/Test^Patient", headers={"Authorization": "Bearer " + token}).status_code == 200
    assert client.get("/v1/Test^Patient/19700101").status_code == 404
    assert client.get("/healthz").status_code == 200  # not audited
    records = log.read()
    assert [(r["principal"], r["status"]) for r in records] == [
        ("anonymous", 401),
        ("key:prometheus", 403),
        ("key:reader", 200),
        ("key:reader", 200),
        ("anonymous", 404),
    ]
    assert {r["action"] for r in records[:4]} == {"GET /v1/jobs/{job_id}"}
    assert records[4]["action"] == "GET unmatched"  # never the raw path
    assert [r["job_id"] for r in records] == [JOB, JOB, JOB, None, None]
    assert records[2]["model"] == "tiny-rgb" and records[2]["input_sha256"] == SHA
    assert "Patient" not in to_json_lines(records) and token not in to_json_lines(records)


@pytest.fixture
def writeless(redis_server, conn):
    """A connection to the test's database as a user that may read but not write (ACL)."""
    conn.execute_command("ACL", "SETUSER", "audit-reader", "on", ">pw", "~*", "&*", "+@all", "-@write")
    reader = connect(f"unix://audit-reader:pw@{redis_server.socket}?db={DB}")
    yield reader
    reader.close()
    conn.execute_command("ACL", "DELUSER", "audit-reader")


def small_app(conn, audit_conn, acted: list) -> FastAPI:
    """The guard and the middleware on ``audit_conn``, and a mutating route that notes it acted."""
    app = FastAPI()
    app.state.auth = Authenticator(True, ApiKeyStore(conn), None)

    @app.post("/v1/jobs/{job_id}")
    def act(job_id: str, principal: Annotated[Principal, requires(Scope.SUBMIT)]) -> dict:
        acted.append(job_id)
        return {"id": job_id}

    @app.get("/v1/jobs/{job_id}")
    def view(job_id: str, principal: Annotated[Principal, requires(Scope.READ)]) -> dict:
        return {"id": job_id}

    install_error_handlers(app)
    app.add_middleware(AuditMiddleware, audit=AuditLog(audit_conn))
    return app


def test_no_answer_leaves_without_its_record_and_nothing_acts_before_its_record(conn, writeless):
    _, token = ApiKeyStore(conn).create("writer", ["submit", "read"])
    acted: list[str] = []
    headers = {"Authorization": "Bearer " + token}
    with TestClient(small_app(conn, writeless, acted)) as client:
        for resp in (
            client.get(f"/v1/jobs/{JOB}", headers=headers),  # would be a 200
            client.get(f"/v1/jobs/{JOB}"),  # would be a 401
            client.post(f"/v1/jobs/{JOB}", headers=headers),  # would act
        ):
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "store_unavailable" and resp.headers["retry-after"] == "5"
            assert "NOPERM" not in resp.text and JOB not in resp.text
    assert acted == []  # refused before it acted: its pending record could not be written
    assert not conn.exists(audit_key()) and not conn.exists(pending_key())
    # With a store that takes writes: the record replaces the pending one, and the route acts.
    with TestClient(small_app(conn, conn, acted)) as client:
        assert client.post(f"/v1/jobs/{JOB}", headers=headers).status_code == 200
    assert acted == [JOB] and not conn.exists(pending_key())
    (record,) = AuditLog(conn).read()
    assert (record["principal"], record["action"], record["status"]) == ("key:writer", "POST /v1/jobs/{job_id}", 200)


def recording_app(conn, audit_conn, acted: list, then_fail: bool = False) -> FastAPI:
    """A mutating route that writes its own final record (``record_answer``), as the job
    routes do; ``then_fail``: it raises after that write."""
    app = FastAPI()
    app.state.auth = Authenticator(True, ApiKeyStore(conn), None)

    @app.post("/v1/jobs/{job_id}")
    def act(request: Request, job_id: str, principal: Annotated[Principal, requires(Scope.SUBMIT)]):
        acted.append(job_id)
        note(request, model="tiny-rgb")
        answer = record_answer(request, JSONResponse({"id": job_id}, status_code=202))
        if then_fail:
            raise BadParameterError("failed after its record")
        return answer

    install_error_handlers(app)
    app.add_middleware(AuditMiddleware, audit=AuditLog(audit_conn, known_models=lambda: {"tiny-rgb"}))
    return app


def test_a_route_that_writes_its_own_record_gets_exactly_one_and_fails_closed_too(redis_server, conn):
    _, token = ApiKeyStore(conn).create("writer", ["submit"])
    headers = {"Authorization": "Bearer " + token}
    acted: list[str] = []
    with TestClient(recording_app(conn, conn, acted)) as client:
        assert client.post(f"/v1/jobs/{JOB}", headers=headers).status_code == 202
    (record,) = AuditLog(conn).read()  # the route's, not one more from the middleware
    assert (record["action"], record["status"], record["model"]) == ("POST /v1/jobs/{job_id}", 202, "tiny-rgb")
    assert not conn.exists(pending_key())
    # An answer with another status than the one recorded (an error after the write) gets its
    # own, which replaces the route's in the same transaction: one record per request, with
    # the status its client got.
    with TestClient(recording_app(conn, conn, acted, then_fail=True)) as client:
        assert client.post(f"/v1/jobs/{JOB}", headers=headers).status_code == 400
    assert [r["status"] for r in AuditLog(conn).read()] == [202, 400]
    # The final record refused after the route acted (a user that may write anything but add to
    # a stream: its pending record is written): the answer is the 503, nothing more is written,
    # and the pending record stays for the sweep (status 503, what the client got).
    conn.delete(audit_key())
    conn.execute_command("ACL", "SETUSER", "no-xadd", "on", ">pw", "~*", "&*", "+@all", "-xadd")
    no_xadd = connect(f"unix://no-xadd:pw@{redis_server.socket}?db={DB}")
    try:
        with TestClient(recording_app(conn, no_xadd, acted)) as client:
            resp = client.post(f"/v1/jobs/{JOB}", headers=headers)
    finally:
        no_xadd.close()
        conn.execute_command("ACL", "DELUSER", "no-xadd")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "store_unavailable", resp.text
    assert acted == [JOB, JOB, JOB] and not conn.exists(audit_key())
    (pending,) = conn.hvals(pending_key())
    assert json.loads(pending)["fields"]["status"] == "503"


def test_a_pending_record_left_behind_is_moved_into_the_trail_once(conn):
    writer = Principal("key", "ci", None, frozenset({"submit"}))
    keeper = AuditLog(conn, orphan_after_seconds=3600)
    left = keeper.begin(writer, "POST /v1/classify")
    kept = keeper.begin(writer, "DELETE /v1/jobs/{job_id}", job_id=JOB)
    keeper.record(writer, "DELETE /v1/jobs/{job_id}", 200, job_id=JOB, pending=kept)  # its final record
    assert conn.hkeys(pending_key()) == [left.encode()] and keeper.sweep() == 0  # not old enough
    first, second = AuditLog(conn, orphan_after_seconds=0), AuditLog(conn, orphan_after_seconds=0)
    assert first.sweep() + second.sweep() == 1 and conn.hlen(pending_key()) == 0
    records = first.read()
    assert [(r["action"], r["status"]) for r in records] == [
        ("DELETE /v1/jobs/{job_id}", 200),
        ("POST /v1/classify", 503),
    ]
    assert records[1]["principal"] == "key:ci" and records[1]["job_id"] is None


def test_the_api_never_records_a_model_name_it_does_not_serve(conn, settings_for, make_image):
    """Through the real app (its catalogue: the test checkpoints, no worker): a request naming a
    model that does not exist leaves ``unknown`` in the trail, the typed name nowhere."""
    from service.app import create_app

    canary = "Canary-MRN-0042"
    _, token = ApiKeyStore(conn).create("ci", ["submit"])
    with TestClient(create_app(settings_for(DB))) as client:
        auth = {"Authorization": "Bearer " + token}
        image = {"image": ("x.png", make_image("PNG", "RGB"), "application/octet-stream")}
        refused = client.post("/v1/classify", files=image, data={"model": canary}, headers=auth)
        served = client.post("/v1/classify", files=image, data={"model": "tiny-rgb"}, headers=auth)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "unknown_model"
    assert served.status_code != 404
    records = [r for r in AuditLog(conn).read() if r["action"] == "POST /v1/classify"]
    assert [r["model"] for r in records] == ["unknown", "tiny-rgb"]
    assert canary not in str(conn.xrange(audit_key())) and canary not in str(conn.hgetall(pending_key()))
