"""Authentication (service/auth): API keys hashed in a real Redis, scopes and revocation, the
start-up check of AEX_AUTH, the route dependency, and OIDC tokens checked against a JWKS the
test serves on 127.0.0.1 with real RSA and EC key pairs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Annotated

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from jobs.epoch import store_epoch
from jobs.keys import store_epoch_key
from jobs.settings import Settings
from models.errors import (
    BadParameterError,
    ForbiddenError,
    KeyExistsError,
    UnauthenticatedError,
    UnknownKeyError,
)
from service.app import install_error_handlers
from service.auth import (
    LOCAL,
    ApiKeyStore,
    Authenticator,
    OidcVerifier,
    Principal,
    Scope,
    can_access,
    check_auth_settings,
    require,
    requires,
    reuse_scope,
)
from service.auth.principal import owner_meta
from service.errors import status_of
from tests.support.oidc import AUDIENCE, Issuer

DB = 11


def every_key_and_value(conn) -> bytes:
    out = []
    for key in conn.scan_iter(count=1000):
        out.append(key)
        kind = conn.type(key)
        if kind == b"string":
            out.append(conn.get(key))
        elif kind == b"hash":
            out += [b for pair in conn.hgetall(key).items() for b in pair]
        elif kind == b"set":
            out += list(conn.smembers(key))
    return b"\n".join(out)


# --- API keys ----------------------------------------------------------------------------
def test_api_keys_are_stored_hashed_never_in_clear(conn):
    store = ApiKeyStore(conn)
    listing, token = store.create("ci-runner", ["submit", "read"])
    # aex_, the store's epoch, _, 43 characters of 32 random bytes, 4 check digits
    assert token.startswith(f"aex_{store_epoch(conn)}_") and len(token) == 60
    assert listing["name"] == "ci-runner" and listing["scopes"] == ["read", "submit"]
    dump = every_key_and_value(conn)
    secret = token.removeprefix("aex_")
    assert token.encode() not in dump and secret.encode() not in dump and secret[:16].encode() not in dump
    assert hashlib.sha256(token.encode()).hexdigest().encode() not in dump  # a domain-separated digest
    principal = store.authenticate(token)
    assert (principal.kind, principal.id, principal.tenant) == ("key", "ci-runner", None)
    assert principal.scopes == frozenset({"submit", "read"}) and principal.label == "key:ci-runner"
    assert store.list() == [listing]  # no token, no digest
    assert "digest" not in json.dumps(store.list()) and token not in json.dumps(store.list())


def test_keys_are_unique_checked_and_revoked_at_once(conn):
    store = ApiKeyStore(conn)
    _, token = store.create("viewer", "read")
    with pytest.raises(KeyExistsError):
        store.create("viewer", ["read"])
    for name, scopes in [("Bad Name", ["read"]), ("../x", ["read"]), ("ok", []), ("ok", ["root"])]:
        with pytest.raises(BadParameterError):
            store.create(name, scopes)
    store.revoke("viewer")
    with pytest.raises(UnauthenticatedError, match="unknown or revoked"):
        store.authenticate(token)
    with pytest.raises(UnknownKeyError):
        store.revoke("viewer")
    # Only the store's epoch is left, and the keys' revision (every cached lookup is checked again).
    assert store.list() == [] and sorted(conn.keys()) == sorted([store_epoch_key().encode(), b"aex:apikeys:revision"])
    # A new key of the revoked one's name is another principal: it gets none of its jobs.
    _, first = store.create("viewer", ["read"])
    before = store.authenticate(first)
    store.revoke("viewer")
    _, second = store.create("viewer", ["read"])
    after = store.authenticate(second)
    assert after.label == before.label and not can_access(after, owner_meta(before))
    for forged in ["aex_" + "A" * 43, token[:-1] + ("A" if token[-1] != "A" else "B"), "aex_short", ""]:
        with pytest.raises(UnauthenticatedError):
            store.authenticate(forged)


def test_the_first_admin_is_created_once(conn):
    store = ApiKeyStore(conn)
    token = store.ensure_first_admin()
    assert token and store.authenticate(token).scopes == frozenset(s.value for s in Scope)
    assert store.ensure_first_admin() is None
    assert [k["name"] for k in store.list()] == ["admin"]


# --- scopes and ownership ----------------------------------------------------------------
def test_scopes_and_job_ownership():
    reader = Principal("key", "reader", None, frozenset({"read"}))
    admin = Principal("key", "root", None, frozenset({"admin"}))
    assert require(reader, Scope.READ) is reader
    with pytest.raises(ForbiddenError, match="'submit' scope"):
        require(reader, Scope.SUBMIT)
    assert all(admin.has(s) for s in Scope)  # admin implies every scope
    mine = owner_meta(reader)
    assert can_access(reader, mine) and can_access(admin, mine)
    other = Principal("key", "other", None, frozenset({"read", "submit"}))
    assert not can_access(other, mine) and not can_access(other, None)
    # Reuse: within the principal, or within its OIDC tenant.
    alice = Principal("oidc", "alice", "ward-7", frozenset({"read"}))
    bob = Principal("oidc", "bob", "ward-7", frozenset({"read"}))
    carol = Principal("oidc", "carol", "ward-9", frozenset({"read"}))
    assert reuse_scope(alice) == reuse_scope(bob) != reuse_scope(carol)
    assert reuse_scope(reader) != reuse_scope(other) and not can_access(bob, owner_meta(alice))


# --- settings and the guard --------------------------------------------------------------
def test_auth_off_is_accepted_on_loopback_only_and_said_loudly(caplog):
    with pytest.raises(BadParameterError, match="loopback"):
        check_auth_settings(Settings(auth="off", host="0.0.0.0"))
    with caplog.at_level(logging.WARNING, logger="aex.auth"):
        check_auth_settings(Settings(auth="off", host="127.0.0.1"))
        check_auth_settings(Settings(auth="off", host="::1"))
    assert "AUTHENTICATION IS OFF" in caplog.text
    check_auth_settings(Settings(host="0.0.0.0"))  # on: any address
    assert Settings().auth == "on"
    with pytest.raises(BadParameterError, match="both"):
        check_auth_settings(Settings(oidc_issuer="https://idp.example.org/realms/x"))
    with pytest.raises(BadParameterError, match="https"):
        check_auth_settings(Settings(oidc_issuer="http://idp.example.org", oidc_audience="a"))
    with pytest.raises(ValueError, match="asymmetric"):
        Settings(oidc_algorithms="RS256,HS256")


def test_the_authenticator_refuses_what_is_not_a_bearer_token(conn):
    store = ApiKeyStore(conn)
    _, token = store.create("k", ["read"])
    auth = Authenticator(True, store, None)
    assert auth.authenticate(f"Bearer {token}").id == "k"
    assert auth.authenticate(f"bearer   {token}  ").id == "k"
    for header in [None, "", "Bearer", f"Basic {token}", "Bearer a.b.c", "Bearer " + "x" * 9000]:
        with pytest.raises(UnauthenticatedError):
            auth.authenticate(header)
    assert Authenticator(False).authenticate(None) is LOCAL


@pytest.fixture
def guarded_app(conn):
    """A tiny app with the guard as the routes will declare it, and the 401 challenge."""
    app = FastAPI()
    app.state.auth = Authenticator(True, ApiKeyStore(conn), None)
    install_error_handlers(app)  # the production handlers: the 401 challenge included

    @app.post("/v1/submit")
    def submit(principal: Annotated[Principal, requires(Scope.SUBMIT)]) -> dict:
        return {"who": principal.label}

    @app.get("/metrics", dependencies=[requires(Scope.METRICS)])
    def metrics() -> dict:
        return {"ok": True}

    with TestClient(app) as client:
        yield client, ApiKeyStore(conn)


def test_routes_answer_401_403_and_200(guarded_app):
    client, store = guarded_app
    _, reader = store.create("reader", ["read"])
    _, submitter = store.create("submitter", ["submit"])
    resp = client.post("/v1/submit")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == 'Bearer realm="aex"'
    assert resp.json()["error"]["code"] == "unauthenticated"
    resp = client.post("/v1/submit", headers={"Authorization": "Bearer aex_" + "x" * 43})
    assert resp.status_code == 401 and 'error="invalid_token"' in resp.headers["www-authenticate"]
    resp = client.post("/v1/submit", headers={"Authorization": f"Bearer {reader}"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    resp = client.post("/v1/submit", headers={"Authorization": f"Bearer {submitter}"})
    assert resp.status_code == 200 and resp.json() == {"who": "key:submitter"}
    assert client.get("/metrics", headers={"Authorization": f"Bearer {submitter}"}).status_code == 403


# --- OIDC --------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def idp():
    issuer = Issuer()
    yield issuer
    issuer.close()


@pytest.fixture
def verifier(idp):
    return OidcVerifier(idp.url, AUDIENCE, tenant_claim="tenant", min_refresh_seconds=60)


def test_a_valid_oidc_token_is_a_principal(idp, verifier):
    principal = verifier.authenticate(idp.token())
    assert principal == Principal("oidc", "user-17", "ward-7", frozenset({"read", "submit"}))
    ec_token = idp.token(key=idp.ec, alg="ES256", kid="ec-1", scope=["metrics", "nonsense"])
    assert verifier.authenticate(ec_token).scopes == frozenset({"metrics"})
    assert idp.jwks_hits == 1  # discovered once, then cached
    nested = OidcVerifier(idp.url, AUDIENCE, jwks_url=f"{idp.url}/jwks", scopes_claim="realm_access.roles")
    assert nested.authenticate(idp.token(realm_access={"roles": ["admin"]})).scopes == frozenset({"admin"})
    # Through the Authenticator, as the routes see it.
    auth = Authenticator(True, None, verifier)
    assert auth.authenticate(f"Bearer {idp.token()}").label == "oidc:user-17@ward-7"


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("expired", "expired"),
        ("wrong_signature", "not valid"),
        ("wrong_audience", "another audience"),
        ("wrong_issuer", "another issuer"),
        ("alg_none", "'none'"),
        ("hs256_with_public_key", "'HS256'"),
        ("no_tenant", "tenant"),
        ("no_expiry", "not valid"),
    ],
)
def test_bad_oidc_tokens_are_refused(idp, verifier, case, fragment):
    if case == "expired":
        token = idp.token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)
    elif case == "wrong_signature":
        token = idp.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    elif case == "wrong_audience":
        token = idp.token(aud="another-client")
    elif case == "wrong_issuer":
        token = idp.token(iss="https://evil.example.org")
    elif case == "alg_none":
        header = b64(json.dumps({"alg": "none", "kid": "rsa-1", "typ": "JWT"}).encode())
        token = f"{header}.{b64(json.dumps(idp.claims()).encode())}."
    elif case == "hs256_with_public_key":  # the classic confusion: the public key as an HMAC secret
        pem = idp.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
        body = b64(json.dumps(idp.claims()).encode())
        sig = b64(hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
        token = f"{header}.{body}.{sig}"
    elif case == "no_tenant":
        token = idp.token(tenant=None)
    else:
        token = idp.token(exp=None)
    with pytest.raises(UnauthenticatedError, match=fragment) as info:
        verifier.authenticate(token)
    assert status_of(info.value.code) == 401


def test_an_unknown_kid_refetches_the_keys_once(idp):
    verifier = OidcVerifier(idp.url, AUDIENCE, min_refresh_seconds=60)
    assert verifier.authenticate(idp.token()).id == "user-17"
    assert idp.jwks_hits == 1
    # The issuer rotates: a new key appears; its first token refetches the JWKS (once the
    # minimum interval since the last fetch has passed: moved back here instead of waited).
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp.published["rsa-2"] = rotated.public_key()
    verifier._fetched_at -= 61
    assert verifier.authenticate(idp.token(key=rotated, kid="rsa-2")).id == "user-17"
    assert idp.jwks_hits == 2
    # A made-up kid is refused; made-up kids right after do not refetch (rate limit).
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for kid in ["made-up-1", "made-up-2", "made-up-3"]:
        with pytest.raises(UnauthenticatedError, match="does not publish"):
            verifier.authenticate(idp.token(key=stranger, kid=kid))
    assert idp.jwks_hits == 2
    # Once the interval has passed, an unknown kid may refetch again (once).
    verifier._fetched_at -= 61
    with pytest.raises(UnauthenticatedError, match="does not publish"):
        verifier.authenticate(idp.token(key=stranger, kid="made-up-4"))
    assert idp.jwks_hits == 3


def test_an_unreachable_identity_provider_is_a_401_not_a_crash(idp):
    verifier = OidcVerifier(idp.url, AUDIENCE)
    token = idp.token()
    idp.close()
    with pytest.raises(UnauthenticatedError, match="could not be fetched"):
        verifier.authenticate(token)


# --- fairness ----------------------------------------------------------------------------
def test_each_principal_has_at_most_its_share_of_jobs(conn):
    from rq.job import Job, JobStatus

    from jobs.rqueue.layout import SERIALIZER
    from models.errors import TooManyJobsError
    from service.quota import active_jobs, release, reserve

    alice = Principal("key", "alice", None, frozenset({"submit"}))
    bob = Principal("key", "bob", None, frozenset({"submit"}))

    def job(status):
        j = Job.create("worker.tasks.classify", connection=conn, serializer=SERIALIZER)
        j.set_status(status)
        j.save()
        return j

    queued = [job(JobStatus.QUEUED) for _ in range(2)]
    for j in queued:
        reserve(conn, alice, j.id, limit=2, ttl=60)
    with pytest.raises(TooManyJobsError) as info:
        reserve(conn, alice, "c" * 32, limit=2, ttl=60)
    assert status_of(info.value.code) == 429
    reserve(conn, bob, "d" * 32, limit=2, ttl=60)  # another principal has its own share
    queued[0].set_status(JobStatus.FINISHED)  # one of alice's jobs ends: a place is free
    reserve(conn, alice, "e" * 32, limit=2, ttl=60)
    assert sorted(active_jobs(conn, alice, keep="e" * 32)) == sorted([queued[1].id, "e" * 32])
    # A reserved id whose job is being enqueued counts for other requests meanwhile.
    assert sorted(active_jobs(conn, alice)) == sorted([queued[1].id, "e" * 32])
    with pytest.raises(TooManyJobsError):
        reserve(conn, alice, "f" * 32, limit=2, ttl=60)
    release(conn, alice, "e" * 32)
    assert active_jobs(conn, alice) == [queued[1].id]
    assert b"alice" not in b"".join(conn.keys("aex:principal-jobs:*"))  # no identity in key names


# --- the key cache -----------------------------------------------------------------------
def test_a_cached_key_is_refused_at_the_next_request_after_its_revocation(service_stack, make_image, monkeypatch):
    """A key looked up once serves the next requests from memory (no lookup: the keys'
    revision confirmed in the request's first round trip), yet a revocation made elsewhere
    (another connection, as ``aex keys revoke`` makes it) refuses the very next request, a
    read and a submission alike, and one whose upload would be refused too. The cache is kept
    for the test: the revocation is seen by the revision, not by the entry running out (on a
    busy machine more than AUTH_CACHE_SECONDS may pass between two requests)."""
    from jobs.queues import connect
    from service.auth import apikeys
    from tests.support.tokens import api_client

    monkeypatch.setattr(apikeys, "AUTH_CACHE_SECONDS", 3600.0)

    def trips(resp) -> int:
        return int(dict(p.split(";desc=") for p in resp.headers["server-timing"].split(", ") if ";desc=" in p)["redis"])

    def png(seed: int) -> dict:
        return {"files": {"image": ("x.png", make_image("PNG", "RGB", seed=seed), "image/png")}}

    other = ApiKeyStore(connect(service_stack.redis_url))
    for request in ("read", "submit"):
        with api_client(service_stack, f"cached-{request}", ("read", "submit")) as client:
            first = client.get("/v1/models")
            again = client.get("/v1/models")
            assert first.status_code == again.status_code == 200
            assert trips(again) < trips(first)  # served from the cache: one round trip, not the lookup
            submitted = client.post("/v1/classify", **png(1901), data={"model": "tiny-rgb"})
            assert submitted.status_code in (200, 202), submitted.text
            other.revoke(f"cached-{request}")
            if request == "read":
                refused = client.get("/v1/models")
            else:
                refused = client.post("/v1/classify", **png(1902), data={"model": "tiny-rgb"})
                # Nor is a refusal of its upload answered to it: the key is confirmed first.
                bad = client.post("/v1/classify", files={"image": ("x.png", b"not an image", "image/png")})
                assert bad.status_code == 401, bad.text
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "unauthenticated"
    other.conn.close()
