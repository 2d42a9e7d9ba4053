"""What a Redis restart without persistence lost is reported as lost (service/auth): API key
tokens carry the store epoch they were made in, so after the store lost its data an earlier
token answers 401 key_lost (never "unknown", never working again), polling a job of the
earlier data with it answers 410 job_lost, and tokens of the earlier form (no epoch) keep
working. On a real redis-server (aex.embedded_redis.EmbeddedRedis, no persistence) SIGKILLed and
started again, as `aex serve --ephemeral`'s supervisor does."""

from __future__ import annotations

import secrets
import signal

import pytest
from fastapi.testclient import TestClient

from jobs.epoch import check_digits, new_job_id, store_epoch
from jobs.keys import api_key_digest_key, api_key_key, api_key_names_key
from jobs.queues import connect
from models.errors import KeyLostError, UnauthenticatedError
from service.app import create_app
from service.auth import ApiKeyStore, token_digest
from service.auth.apikeys import token_epoch
from tests.support.tokens import bearer


def earlier_form_key(conn, name: str) -> str:
    """A key made as aex made them before tokens carried an epoch (``aex_`` + 43 characters),
    stored in the same layout; returns its token."""
    token = "aex_" + secrets.token_urlsafe(32)
    digest = token_digest(token)
    conn.hset(api_key_key(name), mapping={"digest": digest, "scopes": "read submit", "uid": secrets.token_hex(8)})
    conn.hset(api_key_key(name), "created_at", "2025-01-01T00:00:00+00:00")
    conn.set(api_key_digest_key(digest), name)
    conn.sadd(api_key_names_key(), name)
    return token


def forged(epoch: str) -> str:
    body = f"aex_{epoch}_{secrets.token_urlsafe(32)}"
    return body + check_digits(body)


@pytest.fixture
def restarted(tmp_path, settings_on):
    """Keys and a job id of one store epoch, then the store restarted empty: yields the API's
    client and what was made before."""
    from aex.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    conn = connect(server.url)
    try:
        store = ApiKeyStore(conn)
        before = {
            "epoch": store_epoch(conn),
            "admin": store.ensure_first_admin(),  # first: made only while no key exists
            "owner": store.create("alice", ["submit", "read"])[1],
            "earlier_form": earlier_form_key(conn, "legacy"),
            "job": new_job_id(conn),
        }
        assert store.authenticate(before["earlier_form"]).id == "legacy"  # the earlier form works
        assert token_epoch(before["owner"]) == before["epoch"] and token_epoch(before["earlier_form"]) is None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        server.start()  # empty: no append-only file
        assert store_epoch(conn) != before["epoch"]
        with TestClient(create_app(settings_on(server, 0))) as client:
            yield client, store, before
    finally:
        conn.close()
        server.stop()


def test_an_earlier_key_answers_key_lost_and_never_works_again(restarted):
    client, store, before = restarted
    for token in (before["owner"], before["admin"]):
        with pytest.raises(KeyLostError):
            store.authenticate(token)
        resp = client.get("/v1/models", headers=bearer(token))
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "key_lost", resp.text
        assert "ask an admin for a new key" in resp.json()["error"]["message"]
        assert resp.headers["www-authenticate"] == 'Bearer realm="aex", error="invalid_token"'
    # A new first admin is a new token; the earlier one stays lost.
    new_admin = store.ensure_first_admin()
    assert new_admin != before["admin"] and client.get("/v1/models", headers=bearer(new_admin)).status_code == 200
    assert client.get("/v1/models", headers=bearer(before["admin"])).json()["error"]["code"] == "key_lost"


def test_polling_a_lost_job_with_a_lost_key_answers_job_lost(restarted):
    client, store, before = restarted
    lost_key, job = bearer(before["owner"]), before["job"]
    for method, path in [
        ("GET", f"/v1/jobs/{job}"),
        ("GET", f"/v1/jobs/{job}/images/input.png"),
        ("GET", f"/v1/jobs/{job}/dicom/x.dcm"),
        ("DELETE", f"/v1/jobs/{job}"),
    ]:
        resp = client.request(method, path, headers=lost_key)
        assert resp.status_code == 410 and resp.json()["error"]["code"] == "job_lost", (path, resp.text)
    # The same with the new admin's token, as before this change.
    admin = bearer(store.ensure_first_admin())
    assert client.get(f"/v1/jobs/{job}", headers=admin).json()["error"]["code"] == "job_lost"
    # A job id the id itself does not say is lost (this epoch's, mistyped) stays key_lost.
    mistyped = job[:-1] + ("0" if job[-1] != "0" else "1")
    for other in (new_job_id(store.conn), mistyped, "not-a-job"):
        resp = client.get(f"/v1/jobs/{other}", headers=lost_key)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "key_lost", resp.text
    # Without a token nothing is said of the job.
    resp = client.get(f"/v1/jobs/{job}")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthenticated"


def test_what_a_caller_without_a_key_learns(restarted):
    """A token no key answers to is key_lost only when the token itself says it is of another
    epoch (its check digits hold): what anyone can compute from it; whether a key of that
    epoch ever existed is not said. Everything else is "unknown or revoked"."""
    client, store, before = restarted
    now = store_epoch(store.conn)
    invented = forged(secrets.token_hex(4))
    assert client.get("/v1/models", headers=bearer(invented)).json()["error"]["code"] == "key_lost"
    broken = before["owner"][:-4] + ("0000" if not before["owner"].endswith("0000") else "1111")
    unknown = [before["earlier_form"], forged(now), broken, "aex_" + "A" * 43]
    for token in unknown:
        resp = client.get("/v1/models", headers=bearer(token))
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthenticated", token
        assert resp.json()["error"]["message"] == "unknown or revoked API key"
    # A key of this epoch, revoked: unknown or revoked, not lost.
    _, token = store.create("bob", ["read"])
    store.revoke("bob")
    with pytest.raises(UnauthenticatedError, match="unknown or revoked") as info:
        store.authenticate(token)
    assert not isinstance(info.value, KeyLostError)
