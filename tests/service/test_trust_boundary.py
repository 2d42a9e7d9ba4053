"""The trust boundary of issue 10, checked through the real API (real Redis, real workers;
marker e2e): no token is a 401 on every /v1 route, a read-only key cannot submit, one key
cannot see, download or cancel another's job (404, as for a job that does not exist) nor get
its result back for an identical upload, bad OIDC tokens are refused, each principal has its
share of the queue, keys are managed by admins, and the audit trail holds one record per
access. Also: the browser hardening (CORS, trusted hosts, /docs without external loads) and
AEX_AUTH=off, accepted on loopback only."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jobs.keys import audit_key
from jobs.queues import connect
from models.errors import BadParameterError
from service.app import create_app
from service.audit import AuditLog
from tests.support.oidc import AUDIENCE, Issuer
from tests.support.tokens import bearer, token_for

pytestmark = pytest.mark.e2e

JOB = "0123456789abcdef0123456789abcdef"


def upload(data: bytes, name: str = "x.png", media: str = "image/png", **fields):
    return {"files": {"image": (name, data, media)}, "data": {k: str(v) for k, v in fields.items()}}


def fill(path: str) -> str:
    return path.replace("{job_id}", JOB).replace("{name}", "input.png")


class Trail:
    """The audit records written since it was made (the session's stream is shared)."""

    def __init__(self, settings):
        self.conn = connect(settings.redis_url)
        last = self.conn.xrevrange(audit_key(), count=1)
        self.since = last[0][0].decode() if last else None
        self.log = AuditLog(self.conn)

    def records(self) -> list[dict]:
        return self.log.read(since=self.since, limit=10_000)


@pytest.fixture(scope="module")
def anonymous(service_stack):
    with TestClient(create_app(service_stack)) as client:
        yield client


def as_key(client: TestClient, token: str) -> dict:
    return {"headers": bearer(token)}


def poll_as(client: TestClient, url: str, headers: dict, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while (view := client.get(url, headers=headers).json())["status"] not in ("finished", "failed", "cancelled"):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    return view


def test_no_token_is_a_401_on_every_v1_route(service_stack, anonymous):
    trail = Trail(service_stack)
    schema = anonymous.get("/openapi.json").json()
    operations = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops if p.startswith("/v1/")]
    assert len(operations) >= 12
    for method, path in operations:
        for headers in ({}, bearer("aex_" + "A" * 43), {"Authorization": "Basic dXNlcjpwYXNz"}):
            resp = anonymous.request(method, fill(path), headers=headers)
            assert resp.status_code == 401, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "unauthenticated"
            challenge = resp.headers["www-authenticate"]
            assert challenge.startswith("Bearer") and ('error="invalid_token"' in challenge) == bool(headers)
    assert anonymous.get("/metrics").status_code == 401
    # Open, and saying nothing beyond their status.
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    assert anonymous.get("/readyz").json() == {"status": "ready"}
    for path in ("/", "/docs", "/openapi.json", "/static/app.js"):
        assert anonymous.get(path).status_code == 200, path
    # One audit record per refused request (under /v1 and /metrics), nothing for the open ones.
    records = trail.records()
    assert len(records) == 3 * len(operations) + 1
    assert all(r["principal"] == "anonymous" and r["status"] == 401 for r in records)
    assert {r["action"] for r in records} == {f"{m} {p}" for m, p in operations} | {"GET /metrics"}


def test_a_read_only_key_cannot_submit(service_stack, anonymous, make_image):
    reader = token_for(service_stack, "reader", ["read"])
    trail = Trail(service_stack)
    for route in ("/v1/classify", "/v1/explain"):
        resp = anonymous.post(route, **upload(make_image("PNG", "RGB"), model="tiny-rgb"), **as_key(anonymous, reader))
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden", resp.text
        assert "'submit' scope" in resp.json()["error"]["message"]
    assert anonymous.get("/v1/models", **as_key(anonymous, reader)).status_code == 200
    for method, path in (("GET", "/metrics"), ("GET", "/v1/keys"), ("GET", "/v1/audit"), ("POST", "/v1/keys")):
        assert anonymous.request(method, path, **as_key(anonymous, reader)).status_code == 403, path
    records = trail.records()
    assert [(r["principal"], r["status"]) for r in records] == [("key:reader", 403)] * 2 + [("key:reader", 200)] + [
        ("key:reader", 403)
    ] * 4


def test_one_key_cannot_see_download_or_cancel_anothers_job(service_stack, anonymous, dicom_file):
    alice = bearer(token_for(service_stack, "alice", ["submit", "read"]))
    bob = bearer(token_for(service_stack, "bob", ["submit", "read"]))
    admin = bearer(token_for(service_stack))
    yy, xx = np.mgrid[0:40, 0:36]
    scan = dicom_file((xx * 50 + yy * 30 + int(time.time()) % 97).astype(np.uint16), "MONOCHROME2")
    fields = dict(model="tiny-grey", targets="predicted", steps=3)
    trail = Trail(service_stack)

    resp = anonymous.post("/v1/explain", **upload(scan, "scan.dcm", "application/dicom", **fields), headers=alice)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    view = poll_as(anonymous, f"/v1/jobs/{job_id}", alice)
    assert view["status"] == "finished" and view["dicom"], view
    image, dicom = next(iter(view["images"].values())), next(iter(view["dicom"].values()))
    assert anonymous.get(image, headers=alice).status_code == 200
    assert anonymous.get(dicom, headers=alice).status_code == 200

    def same_as_missing(resp, missing_path: str) -> None:
        """Bob's answer about alice's job is the answer about a job that does not exist."""
        missing = anonymous.get(missing_path, headers=bob)
        assert resp.status_code == missing.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == missing.json()["error"]["code"] == "unknown_job"
        assert resp.json()["error"]["message"].replace(job_id, JOB) == missing.json()["error"]["message"]

    same_as_missing(anonymous.get(f"/v1/jobs/{job_id}", headers=bob), f"/v1/jobs/{JOB}")
    same_as_missing(anonymous.get(image, headers=bob), fill("/v1/jobs/{job_id}/images/{name}"))
    same_as_missing(anonymous.get(dicom, headers=bob), f"/v1/jobs/{JOB}/dicom/x.dcm")
    same_as_missing(anonymous.delete(f"/v1/jobs/{job_id}", headers=bob), f"/v1/jobs/{JOB}")
    assert anonymous.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "finished"  # untouched
    assert anonymous.get(f"/v1/jobs/{job_id}", headers=admin).status_code == 200  # admin sees every job

    # Bob's identical upload is computed for bob: never answered with alice's job or its id.
    again = anonymous.post("/v1/explain", **upload(scan, "scan.dcm", "application/dicom", **fields), headers=bob)
    assert again.status_code == 202 and again.json()["id"] != job_id and job_id not in again.text
    # Alice's own identical upload is answered from her result, under a new id of hers.
    mine = anonymous.post("/v1/explain", **upload(scan, "scan.dcm", "application/dicom", **fields), headers=alice)
    assert mine.status_code == 200 and mine.json()["result"]["reused"] is True and job_id not in mine.text
    assert anonymous.get(mine.json()["url"], headers=bob).status_code == 404
    assert anonymous.get(f"/v1/jobs/{again.json()['id']}", headers=alice).status_code == 404
    assert anonymous.delete(f"/v1/jobs/{again.json()['id']}", headers=bob).status_code in (200, 202)

    # One audit record per access, each naming who, what, which job and how it ended.
    records = trail.records()
    alice_views = sum(1 for r in records if r["action"] == "GET /v1/jobs/{job_id}" and r["principal"] == "key:alice")
    # Submit; alice's views (her polls, her look at bob's job); her two downloads; bob's four
    # tries and the four unknown ids he compared them with; the admin's view; the two uploads;
    # bob's look at alice's second job; bob's cancel of his own.
    assert len(records) == 1 + alice_views + 2 + 8 + 1 + 2 + 1 + 1
    submitted = records[0]
    assert (submitted["principal"], submitted["action"], submitted["status"]) == ("key:alice", "POST /v1/explain", 202)
    assert submitted["job_id"] == job_id and submitted["model"] == "tiny-grey"
    assert submitted["input_sha256"] == view["result"]["provenance"]["input_sha256"]
    refused = [r for r in records if r["principal"] == "key:bob" and r["status"] == 404]
    assert {r["action"] for r in refused} >= {
        "GET /v1/jobs/{job_id}",
        "GET /v1/jobs/{job_id}/images/{name}",
        "GET /v1/jobs/{job_id}/dicom/{name}",
        "DELETE /v1/jobs/{job_id}",
    }
    assert any(r["job_id"] == job_id for r in refused)
    assert "Patient" not in json.dumps(records)


def test_each_principal_has_its_share_of_the_queue(service_stack, make_image, long_steps):
    settings = service_stack.model_copy(update={"max_jobs_per_principal": 1})
    carol = bearer(token_for(service_stack, "carol", ["submit", "read"]))
    dave = bearer(token_for(service_stack, "dave", ["submit", "read"]))
    with TestClient(create_app(settings)) as client:
        fields = dict(model="tiny-rgb", targets="predicted", steps=long_steps)
        first = client.post("/v1/explain", **upload(make_image("PNG", "RGB", seed=901), **fields), headers=carol)
        assert first.status_code == 202, first.text
        try:
            second = client.post("/v1/explain", **upload(make_image("PNG", "RGB", seed=902), **fields), headers=carol)
            assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_jobs", second.text
            # Another principal is not held back by carol's share.
            other = client.post(
                "/v1/classify", **upload(make_image("PNG", "RGB", seed=903), model="tiny-rgb"), headers=dave
            )
            assert other.status_code == 200, other.text
        finally:
            client.delete(first.headers["location"], headers=carol)
        deadline = time.monotonic() + 60
        while client.get(first.headers["location"], headers=carol).json()["status"] != "cancelled":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Its job over, carol has her place again.
        third = client.post(
            "/v1/classify", **upload(make_image("PNG", "RGB", seed=904), model="tiny-rgb"), headers=carol
        )
        assert third.status_code == 200, third.text


def test_admins_manage_keys_and_read_the_trail(service_stack, anonymous, make_image):
    admin = bearer(token_for(service_stack))
    trail = Trail(service_stack)
    name = f"ci-{int(time.time() * 1000) % 10**9}"
    # No token: refused before the body is read (this one is not even JSON).
    assert (
        anonymous.post("/v1/keys", content=b"{not json", headers={"Content-Type": "application/json"}).status_code
        == 401
    )
    created = anonymous.post("/v1/keys", json={"name": name, "scopes": ["read"]}, headers=admin)
    assert created.status_code == 201, created.text
    key = created.json()
    assert key["name"] == name and key["scopes"] == ["read"] and key["token"].startswith("aex_")
    assert created.headers["cache-control"] == "no-store"
    assert anonymous.get("/v1/models", headers=bearer(key["token"])).status_code == 200
    listing = anonymous.get("/v1/keys", headers=admin).json()["keys"]
    assert {"name": name, "scopes": ["read"], "created_at": key["created_at"]} in listing
    assert key["token"] not in json.dumps(listing)
    assert anonymous.post("/v1/keys", json={"name": name, "scopes": ["read"]}, headers=admin).status_code == 409
    for body in ({"name": "Bad Name", "scopes": ["read"]}, {"name": "ok", "scopes": ["root"]}, {"name": "ok"}, []):
        bad = anonymous.post("/v1/keys", json=body, headers=admin)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_parameter", (body, bad.text)
    assert anonymous.post("/v1/keys", json={"name": "x" * 5000, "scopes": []}, headers=admin).status_code == 413
    revoked = anonymous.delete(f"/v1/keys/{name}", headers=admin)
    assert revoked.status_code == 200 and revoked.json() == {"name": name, "revoked": True}
    assert anonymous.get("/v1/models", headers=bearer(key["token"])).status_code == 401  # at once
    assert anonymous.delete(f"/v1/keys/{name}", headers=admin).json()["error"]["code"] == "unknown_key"

    audit = anonymous.get("/v1/audit", params={"since": trail.since or "1h"}, headers=admin)
    assert audit.status_code == 200 and audit.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in audit.text.splitlines()]
    actions = [(r["principal"], r["action"], r["status"]) for r in lines]
    assert actions[:3] == [
        ("anonymous", "POST /v1/keys", 401),
        ("key:tests-admin", "POST /v1/keys", 201),
        (f"key:{name}", "GET /v1/models", 200),
    ]
    assert ("key:tests-admin", "DELETE /v1/keys/{name}", 200) in actions
    assert ("anonymous", "GET /v1/models", 401) in actions  # the revoked key, refused
    assert key["token"] not in audit.text
    assert anonymous.get("/v1/audit", params={"since": "yesterday"}, headers=admin).status_code == 400


@pytest.fixture
def idp():
    issuer = Issuer()
    yield issuer
    issuer.close()


def test_oidc_tokens_expired_wrongly_signed_or_for_another_audience_are_401(service_stack, idp, make_image):
    from cryptography.hazmat.primitives.asymmetric import rsa

    settings = service_stack.model_copy(
        update={"oidc_issuer": idp.url, "oidc_audience": AUDIENCE, "oidc_tenant_claim": "tenant"}
    )
    trail = Trail(service_stack)
    with TestClient(create_app(settings)) as client:
        now = int(time.time())
        bad = {
            "expired": idp.token(exp=now - 3600, iat=now - 7200),
            "wrongly signed": idp.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            "for another audience": idp.token(aud="another-client"),
        }
        for what, token in bad.items():
            resp = client.get("/v1/models", headers=bearer(token))
            assert resp.status_code == 401, (what, resp.text)
            assert 'error="invalid_token"' in resp.headers["www-authenticate"], what
        assert client.get("/v1/models", headers=bearer(idp.token())).status_code == 200
        # Two subjects of one tenant: each sees only its own jobs, but reuse stays within the tenant.
        image = make_image("PNG", "RGB", seed=int(time.time()) % 10_000)
        alice = bearer(idp.token(sub="alice"))
        bob = bearer(idp.token(sub="bob"))
        first = client.post("/v1/classify", **upload(image, model="tiny-rgb"), headers=alice)
        assert first.status_code == 200 and first.json()["result"]["reused"] is False, first.text
        second = client.post("/v1/classify", **upload(image, model="tiny-rgb"), headers=bob)
        assert second.status_code == 200 and second.json()["result"]["reused"] is True
        assert first.json()["id"] not in second.text
        assert client.get(first.json()["url"], headers=bob).status_code == 404
        other_ward = bearer(idp.token(sub="carol", tenant="ward-9"))
        third = client.post("/v1/classify", **upload(image, model="tiny-rgb"), headers=other_ward)
        assert third.status_code == 200 and third.json()["result"]["reused"] is False
    principals = [(r["principal"], r["status"]) for r in trail.records()]
    assert principals[:4] == [("anonymous", 401)] * 3 + [("oidc:user-17@ward-7", 200)]
    assert ("oidc:alice@ward-7", 200) in principals and ("oidc:bob@ward-7", 404) in principals


def test_cors_only_for_the_allowed_origins_and_trusted_hosts(service_stack):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with TestClient(create_app(service_stack)) as client:  # default: no CORS at all
        resp = client.options("/v1/models", headers={"Origin": "https://ohif.example.org", **preflight})
        assert "access-control-allow-origin" not in resp.headers
    allowed = service_stack.model_copy(
        update={"cors_origins": ["https://ohif.example.org"], "trusted_hosts": ["aex.example.org", "testserver"]}
    )
    with TestClient(create_app(allowed)) as client:
        ok = client.options("/v1/models", headers={"Origin": "https://ohif.example.org", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ohif.example.org"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in ok.headers
        evil = client.options("/v1/models", headers={"Origin": "https://evil.example.net", **preflight})
        assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
        # A simple request from an allowed origin still needs its token.
        assert client.get("/v1/models", headers={"Origin": "https://ohif.example.org"}).status_code == 401
        assert client.get("/healthz", headers={"Host": "aex.example.org"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "evil.example.net"}).status_code == 400
    with pytest.raises(ValueError, match="no '\\*'"):
        service_stack.model_validate({**service_stack.model_dump(), "cors_origins": "*"})


def test_docs_are_served_without_any_external_load(anonymous):
    page = anonymous.get("/docs")
    assert page.status_code == 200
    assert not re.search(r"https?://", page.text), "the page names an outside address"
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self' 'sha256-" in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert src.startswith("/docs/"), src
        assert anonymous.get(src).status_code == 200, src
    assert anonymous.get("/docs/index.html").status_code == 404  # only the three files it uses
    assert anonymous.get("/redoc").status_code == 404
    schema = anonymous.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearer"]["description"],
    }
    assert schema["paths"]["/v1/classify"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_auth_off_is_for_loopback_only(service_stack):
    with TestClient(create_app(service_stack.model_copy(update={"auth": "off"}))) as client:
        assert client.get("/v1/models").status_code == 200  # the local user, every scope
        assert client.get("/metrics").status_code == 200
    with pytest.raises(BadParameterError, match="loopback"):
        create_app(service_stack.model_copy(update={"auth": "off", "host": "0.0.0.0"}))
    with pytest.raises(BadParameterError, match="AEX_DATA_KEY is not set"):
        create_app(service_stack.model_copy(update={"data_key": None}))
