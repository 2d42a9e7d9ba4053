"""The administration commands (``aex keys``, ``aex audit``, ``aex data-key``), the token file
and the client's token: straight on a real Redis, and through the API's routes as the
client calls them (a mock transport that checks the bearer token)."""

from __future__ import annotations

import json
import os
import stat

import httpx
import pytest
from typer.testing import CliRunner

from aex.cli import app
from aex.client import AexClient
from aex.credentials import default_token_file, read_token, resolve_token, write_token
from jobs.crypto import parse_data_key
from jobs.queues import connect
from models.errors import BadParameterError, UnauthenticatedError
from service.audit import AuditLog
from service.auth import ApiKeyStore

DB = 14
runner = CliRunner()


@pytest.fixture
def redis_url(redis_server):
    url = f"{redis_server.url}?db={DB}"
    conn = connect(url)
    conn.flushdb()
    yield url
    conn.flushdb()
    conn.close()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_keys_create_list_revoke_straight_on_redis(redis_url, tmp_path):
    created = json.loads(invoke("keys", "create", "ci", "--scopes", "submit,read", "--redis-url", redis_url).stdout)
    assert created["name"] == "ci" and created["scopes"] == ["read", "submit"] and created["token"].startswith("aex_")
    conn = connect(redis_url)
    store = ApiKeyStore(conn)
    assert store.authenticate(created["token"]).id == "ci"
    saved = json.loads(
        invoke(
            "keys", "create", "ops", "--scopes", "admin", "--save", str(tmp_path / "t"), "--redis-url", redis_url
        ).stdout
    )
    assert "token" not in saved and saved["token_file"] == str(tmp_path / "t")
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o600
    assert store.authenticate(read_token(tmp_path / "t")).has("admin")
    listed = json.loads(invoke("keys", "list", "--redis-url", redis_url).stdout)
    assert [k["name"] for k in listed] == ["ci", "ops"] and "aex_" not in json.dumps(listed)
    invoke("keys", "revoke", "ci", "--redis-url", redis_url)
    with pytest.raises(UnauthenticatedError):
        store.authenticate(created["token"])
    result = runner.invoke(app, ["keys", "revoke", "ci", "--redis-url", redis_url])
    assert result.exit_code == 2 and "error [unknown_key]" in result.output
    result = runner.invoke(app, ["keys", "create", "x", "--scopes", "root", "--redis-url", redis_url])
    assert result.exit_code == 2 and "error [bad_parameter]" in result.output
    # Every change is in the audit trail, read with aex audit.
    lines = invoke("audit", "--since", "1h", "--redis-url", redis_url).stdout.splitlines()
    actions = [json.loads(line)["action"] for line in lines]
    assert actions == ["key.create", "key.create", "key.list", "key.revoke"]
    assert all(json.loads(line)["principal"] == "redis:aex-cli" for line in lines)
    assert created["token"] not in "".join(lines)
    conn.close()


def test_data_key_prints_a_fresh_key():
    one, two = invoke("data-key").stdout.strip(), invoke("data-key").stdout.strip()
    assert one != two and len(parse_data_key(one)) == 32


def test_the_token_file(tmp_path):
    path = write_token(tmp_path / "cfg" / "aex" / "token", "aex_secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_token(path) == "aex_secret"
    write_token(path, "aex_other")  # replaced whole
    assert read_token(path) == "aex_other" and len(os.listdir(path.parent)) == 1
    os.chmod(path, 0o644)
    with pytest.raises(BadParameterError, match="chmod 600"):
        read_token(path)
    assert read_token(tmp_path / "absent") is None
    assert default_token_file({"AEX_TOKEN_FILE": str(tmp_path / "t")}) == tmp_path / "t"
    assert default_token_file({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "aex" / "token"
    os.chmod(path, 0o600)
    env = {"AEX_TOKEN_FILE": str(path)}
    assert resolve_token(None, env) == "aex_other"
    assert resolve_token(None, {**env, "AEX_TOKEN": "aex_env"}) == "aex_env"
    assert resolve_token("aex_arg", {**env, "AEX_TOKEN": "aex_env"}) == "aex_arg"
    assert resolve_token(None, {"AEX_TOKEN_FILE": str(tmp_path / "none")}) is None


class FakeApi:
    """The key and audit routes as the wiring will serve them, behind a bearer check."""

    def __init__(self, conn, admin_token: str):
        self.store, self.audit, self.admin = ApiKeyStore(conn), AuditLog(conn), admin_token
        self.seen: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(str(request.url))
        if request.headers.get("authorization") != f"Bearer {self.admin}":
            return httpx.Response(401, json={"error": {"code": "unauthenticated", "message": "no"}})
        path, method = request.url.path, request.method
        if (method, path) == ("POST", "/v1/keys"):
            body = json.loads(request.content)
            listing, token = self.store.create(body["name"], body["scopes"])
            return httpx.Response(201, json={**listing, "token": token})
        if (method, path) == ("GET", "/v1/keys"):
            return httpx.Response(200, json={"keys": self.store.list()})
        if method == "DELETE" and path.startswith("/v1/keys/"):
            self.store.revoke(path.rsplit("/", 1)[1])
            return httpx.Response(200, json={"name": path.rsplit("/", 1)[1], "revoked": True})
        if (method, path) == ("GET", "/v1/audit"):
            from service.audit import to_json_lines

            records = self.audit.read(since=request.url.params.get("since"))
            return httpx.Response(200, text=to_json_lines(records), headers={"content-type": "application/x-ndjson"})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})


def test_the_client_sends_its_token_and_only_to_its_service(redis_url, tmp_path, monkeypatch):
    conn = connect(redis_url)
    admin = ApiKeyStore(conn).ensure_first_admin()
    fake = FakeApi(conn, admin)
    write_token(tmp_path / "token", admin)
    monkeypatch.delenv("AEX_TOKEN", raising=False)
    monkeypatch.setenv("AEX_TOKEN_FILE", str(tmp_path / "token"))
    with AexClient("http://127.0.0.1:8000", transport=httpx.MockTransport(fake)) as client:  # token from the file
        key = client.create_key("viewer", ["read"])
        assert key["token"].startswith("aex_") and key["scopes"] == ["read"]
        assert [k["name"] for k in client.list_keys()] == ["admin", "viewer"]
        assert client.revoke_key("viewer")["revoked"] is True
        AuditLog(conn).record("key:admin", "POST /v1/keys", 201)
        assert [r["action"] for r in client.audit(since="1h")] == ["POST /v1/keys"]
        with pytest.raises(BadParameterError, match="not an address of the service"):
            client.download("http://elsewhere.example.org/steal")
    assert all(u.startswith("http://127.0.0.1:8000/") for u in fake.seen)
    with AexClient("http://127.0.0.1:8000", token="aex_" + "x" * 43, transport=httpx.MockTransport(fake)) as client:
        with pytest.raises(UnauthenticatedError) as info:
            client.list_keys()
        assert info.value.http_status == 401
    with pytest.warns(UserWarning, match="without TLS"):
        AexClient("http://aex.example.org:8000", token="aex_x").close()
    # The CLI through the API (its client on the same fake service).
    monkeypatch.setattr(
        "aex.commands.admin._client",
        lambda url, token: AexClient(url, token=token, transport=httpx.MockTransport(fake)),
    )
    made = json.loads(invoke("keys", "create", "ci", "--scopes", "submit").stdout)
    assert made["name"] == "ci" and made["token"].startswith("aex_")
    assert [k["name"] for k in json.loads(invoke("keys", "list").stdout)] == ["admin", "ci"]
    result = runner.invoke(app, ["keys", "list", "--token", "aex_" + "y" * 43])
    assert result.exit_code == 2 and "error [unauthenticated]" in result.output
    conn.close()
