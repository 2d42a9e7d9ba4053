"""The OIDC key refresh with a slow identity provider on loopback (service/auth/oidc.py): no lock held across the fetch, one fetch in flight, bounded waits."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from models.errors import UnauthenticatedError
from service.auth.oidc import OidcVerifier
from tests.support.oidc import AUDIENCE, Issuer

HELD_AT_MOST = 30.0  # how long the slow provider holds an answer when the test never releases it


class SlowIssuer(Issuer):
    """The test identity provider, whose JWKS answers wait until the test opens ``gate``
    (a provider as slow as the test needs it to be, without a sleep to race)."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Semaphore(0)  # released once per JWKS request that waits

    def jwk(self, kid, public_key) -> dict:
        if not self.gate.is_set():
            self.waiting.release()
            self.gate.wait(HELD_AT_MOST)
        return Issuer.jwk(kid, public_key)


@pytest.fixture
def idp():
    issuer = SlowIssuer()
    yield issuer
    issuer.gate.set()
    issuer.close()


def authenticate_all(verifier, tokens, timeout: float = 20.0) -> list:
    """Each token's principal (or its error), authenticated concurrently."""
    with ThreadPoolExecutor(len(tokens)) as pool:
        futures = [pool.submit(verifier.authenticate, t) for t in tokens]
        return [f.exception(timeout) or f.result() for f in futures]


def test_known_keys_never_wait_for_a_slow_fetch_and_unknown_ones_share_one(idp):
    verifier = OidcVerifier(idp.url, AUDIENCE, min_refresh_seconds=0)
    assert verifier.authenticate(idp.token()).id == "user-17"
    assert verifier.fetches == 1 and idp.jwks_hits == 1
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp.published["rsa-2"] = rotated.public_key()
    idp.gate.clear()  # the provider is slow from now on: held until the test says
    with ThreadPoolExecutor(4) as waiting:
        # Four requests with the rotated key: one fetch, the others wait on it.
        new_key = [waiting.submit(verifier.authenticate, idp.token(key=rotated, kid="rsa-2")) for _ in range(4)]
        assert idp.waiting.acquire(timeout=20), "the fetch did not reach the provider"
        # While that fetch is held: eight requests with a known key all answer.
        assert [p.id for p in authenticate_all(verifier, [idp.token() for _ in range(8)])] == ["user-17"] * 8
        assert not any(f.done() for f in new_key)  # still waiting on the held fetch
        idp.gate.set()
        assert [f.result(20).id for f in new_key] == ["user-17"] * 4
    assert verifier.fetches == 2 and idp.jwks_hits == 2  # one fetch for the four


def test_stale_keys_are_refreshed_in_the_background_one_fetch_at_a_time(idp):
    verifier = OidcVerifier(idp.url, AUDIENCE, cache_seconds=0)  # stale at once: every request wants a refresh
    assert verifier.authenticate(idp.token()).id == "user-17"
    idp.gate.clear()
    assert [p.id for p in authenticate_all(verifier, [idp.token() for _ in range(8)])] == ["user-17"] * 8
    assert idp.waiting.acquire(timeout=20), "no refresh reached the provider"
    assert verifier.fetches == 2  # one refresh in flight for the eight, none waited on it
    idp.gate.set()
    assert not idp.waiting.acquire(timeout=0.5) and idp.jwks_hits == 2


def test_waits_on_a_held_fetch_are_bounded_and_a_fetch_times_out(idp):
    http = httpx.Client(timeout=3.0, trust_env=False, follow_redirects=False)
    verifier = OidcVerifier(idp.url, AUDIENCE, min_refresh_seconds=60, refresh_wait_seconds=0.3, http=http)
    assert verifier.authenticate(idp.token()).id == "user-17"
    verifier._fetched_at -= 61  # the minimum interval between fetches has passed (instead of waited)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp.gate.clear()  # never answers within the client's time-out
    with ThreadPoolExecutor(1) as one:
        fetcher = one.submit(verifier.authenticate, idp.token(key=stranger, kid="unknown"))
        assert idp.waiting.acquire(timeout=20), "the fetch did not reach the provider"
        # Requests needing a key not known yet wait on the held fetch, each at most 0.3 s.
        errors = authenticate_all(verifier, [idp.token(key=stranger, kid="unknown") for _ in range(3)])
        assert [e.message for e in errors] == [
            "the identity provider's keys are being fetched and did not arrive in time"
        ] * 3
        assert not fetcher.done()
        with pytest.raises(UnauthenticatedError, match="does not publish"):
            fetcher.result(20)  # the fetch timed out (3 s a read): the cached keys stay
    assert "could not be fetched (ReadTimeout)" in verifier._failure.message
    assert verifier.fetches == 2 and idp.jwks_hits == 2  # the waiters fetched nothing
    assert verifier.authenticate(idp.token()).id == "user-17"  # the cached keys still verify


def test_a_trickling_provider_is_cut_at_the_refresh_deadline(monkeypatch):
    """A provider that keeps sending a byte now and then never trips the per-read time-out: the
    whole refresh is cut at its deadline (1 s here instead of 10) all the same."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import service.auth.oidc as oidc

    stop = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            while not stop.wait(0.1):  # a space every 0.1 s, for as long as the client reads
                self.wfile.write(b" ")
                self.wfile.flush()

        def log_message(self, *_args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(oidc, "FETCH_DEADLINE_SECONDS", 1.0)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    verifier = OidcVerifier(url, AUDIENCE, jwks_url=f"{url}/jwks")
    issuer = Issuer()
    try:
        with ThreadPoolExecutor(1) as one:
            attempt = one.submit(verifier.authenticate, issuer.token())
            with pytest.raises(UnauthenticatedError, match="did not arrive within 1 s"):
                attempt.result(20)  # well before the trickle would end (never, until stopped)
        assert verifier.fetches == 1
    finally:
        stop.set()
        issuer.close()
        httpd.shutdown()
        httpd.server_close()
