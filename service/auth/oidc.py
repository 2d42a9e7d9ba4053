"""OIDC bearer tokens: the issuer's keys (JWKS, cached and refreshed on an unknown kid) and the check of a token by PyJWT.

Signature, expiry (``exp``, required), not-before, audience and issuer are checked by PyJWT,
never by hand. Only the configured asymmetric algorithms are accepted, and each key verifies
only with the algorithm of its own type (an RSA key never as an HMAC secret; ``none`` never).
The JWKS address comes from ``AEX_OIDC_JWKS_URL`` or the issuer's
``/.well-known/openid-configuration``; it must be https (or http on a loopback address).
Keys are cached ``AEX_OIDC_JWKS_CACHE_SECONDS``; a token naming an unknown ``kid`` refetches
them, at most once every ``min_refresh_seconds``, so a flood of made-up kids cannot turn the
service into a JWKS-fetching loop.

A slow identity provider never holds up the requests whose key is known: the lock guards the
cached keys only, never a fetch. One fetch is in flight at a time, made outside the lock and
bounded (each read ``FETCH_TIMEOUT_SECONDS``, the whole refresh ``FETCH_DEADLINE_SECONDS``).
Keys gone stale are refetched in the background while the cached ones keep verifying; only a
request whose key is not known yet (the first, or a rotated key) waits for the fetch in flight,
at most ``refresh_wait_seconds``. Torch-free.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from models.errors import BadParameterError, UnauthenticatedError
from service.auth.principal import ALL_SCOPES, Principal

log = logging.getLogger("aex.auth")

# The key type each algorithm family verifies with.
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
LEEWAY_SECONDS = 30
FETCH_TIMEOUT_SECONDS = 5.0  # each connect or read of a fetch
FETCH_DEADLINE_SECONDS = 10.0  # the whole refresh (discovery and JWKS): a trickling answer is cut
REFRESH_WAIT_SECONDS = FETCH_DEADLINE_SECONDS + FETCH_TIMEOUT_SECONDS + 1.0  # a request waiting on a fetch
MAX_JWKS_BYTES = 512 * 1024


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def check_fetch_url(url: str, what: str) -> str:
    """``url`` if keys may be fetched from it: https, or http on a loopback address."""
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname)):
        return url
    raise BadParameterError(f"{what} must be an https:// address (http:// only on a loopback address), got {url!r}")


def claim(claims: dict[str, Any], path: str) -> Any:
    """The claim at ``path``; a dotted path reaches into objects (``realm_access.roles``)."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return claims.get(path)  # a claim whose own name holds a dot
        value = value[part]
    return value


def scopes_of(value: Any) -> frozenset[str]:
    """aex's scopes in a claim: a space-separated string or a list of strings; others ignored."""
    if isinstance(value, str):
        items = value.split()
    elif isinstance(value, (list, tuple)):
        items = [v for v in value if isinstance(v, str)]
    else:
        items = []
    return frozenset(items) & ALL_SCOPES


class OidcVerifier:
    """Checks OIDC bearer tokens of one issuer for one audience."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        algorithms: list[str] | tuple[str, ...] = ("RS256", "ES256"),
        scopes_claim: str = "scope",
        tenant_claim: str | None = None,
        cache_seconds: float = 300.0,
        min_refresh_seconds: float = 10.0,
        http: httpx.Client | None = None,
        refresh_wait_seconds: float = REFRESH_WAIT_SECONDS,
    ):
        if not issuer or not audience:
            raise BadParameterError("OIDC needs both AEX_OIDC_ISSUER and AEX_OIDC_AUDIENCE")
        self.issuer = issuer
        self.audience = audience
        self.jwks_url = check_fetch_url(jwks_url, "AEX_OIDC_JWKS_URL") if jwks_url else None
        if self.jwks_url is None:
            check_fetch_url(issuer, "AEX_OIDC_ISSUER (its keys are discovered from it)")
        self.algorithms = list(algorithms)
        self.scopes_claim, self.tenant_claim = scopes_claim, tenant_claim
        self.cache_seconds, self.min_refresh_seconds = cache_seconds, min_refresh_seconds
        # No proxy from the environment, no redirects; the system's trust store (and
        # SSL_CERT_FILE) for a hospital's own certificate authority.
        self.http = http or httpx.Client(
            timeout=FETCH_TIMEOUT_SECONDS, trust_env=False, follow_redirects=False, verify=ssl.create_default_context()
        )
        self.refresh_wait_seconds = refresh_wait_seconds
        self._lock = threading.Lock()  # guards the fields below; never held across a fetch
        self._keys: dict[str | None, dict[str, Any]] = {}
        self._fetched_at: float | None = None
        self._in_flight: threading.Event | None = None  # set when the fetch in flight ends
        self._failure: UnauthenticatedError | None = None  # why the last fetch failed
        self.fetches = 0  # how many times the JWKS was fetched (tests read it)

    @classmethod
    def from_settings(cls, settings) -> OidcVerifier:
        return cls(
            issuer=settings.oidc_issuer,
            audience=settings.oidc_audience,
            jwks_url=settings.oidc_jwks_url,
            algorithms=settings.oidc_algorithms,
            scopes_claim=settings.oidc_scopes_claim,
            tenant_claim=settings.oidc_tenant_claim,
            cache_seconds=settings.oidc_jwks_cache_seconds,
        )

    # --- keys --------------------------------------------------------------------------
    def _get_json(self, url: str, deadline: float) -> dict[str, Any]:
        try:
            with self.http.stream("GET", url, headers={"Accept": "application/json"}) as resp:
                content = b""
                for chunk in resp.iter_bytes():
                    content += chunk
                    if len(content) > MAX_JWKS_BYTES or time.monotonic() > deadline:
                        break
        except httpx.HTTPError as exc:
            raise UnauthenticatedError(
                f"the identity provider's keys could not be fetched ({type(exc).__name__})"
            ) from None
        if time.monotonic() > deadline:
            raise UnauthenticatedError(
                f"the identity provider's keys did not arrive within {FETCH_DEADLINE_SECONDS:.0f} s"
            )
        if resp.status_code != 200 or len(content) > MAX_JWKS_BYTES:
            raise UnauthenticatedError(f"the identity provider answered HTTP {resp.status_code} for its keys")
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise UnauthenticatedError("the identity provider's keys are not a JSON object")
        return body

    def _discover(self, deadline: float) -> str:
        if self.jwks_url is None:
            doc = self._get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration", deadline)
            if doc.get("issuer") != self.issuer:
                raise UnauthenticatedError("the identity provider's discovery document names another issuer")
            self.jwks_url = check_fetch_url(str(doc.get("jwks_uri") or ""), "the discovered jwks_uri")
        return self.jwks_url

    def _load(self) -> dict[str | None, dict[str, Any]]:
        """The issuer's signing keys by kid, fetched now (outside the lock)."""
        deadline = time.monotonic() + FETCH_DEADLINE_SECONDS
        jwks = self._get_json(self._discover(deadline), deadline)
        keys: dict[str | None, dict[str, Any]] = {}
        for jwk in jwks.get("keys") or []:
            if not isinstance(jwk, dict) or jwk.get("kty") not in KEY_TYPES.values():
                continue  # symmetric ("oct") and unknown key types are never used
            if jwk.get("use", "sig") != "sig":
                continue
            keys[jwk.get("kid")] = jwk
        return keys

    def _begin_fetch(self) -> tuple[threading.Event, bool]:
        """The fetch in flight, and whether the caller must make it (it began none). Under the lock."""
        if self._in_flight is not None:
            return self._in_flight, False
        self.fetches += 1
        self._fetched_at = time.monotonic()  # set first: a failing fetch is rate-limited too
        self._in_flight = threading.Event()
        return self._in_flight, True

    def _fetch(self, done: threading.Event) -> None:
        """Make the fetch ``_begin_fetch`` began, outside the lock; then wake its waiters."""
        keys, failure = None, None
        try:
            keys = self._load()
        except UnauthenticatedError as exc:
            failure = exc
        except Exception as exc:  # a bug of ours: the waiters must still wake
            failure = UnauthenticatedError(f"the identity provider's keys could not be read ({type(exc).__name__})")
        with self._lock:
            if keys is not None:
                self._keys = keys
            self._failure, self._in_flight = failure, None
        if failure is not None and keys is None:
            log.warning("the identity provider's keys could not be fetched: %s", failure.message)
        done.set()

    def _lookup(self, kid: str | None) -> dict[str, Any] | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    def _key_for(self, kid: str | None) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            jwk = self._lookup(kid)
            stale = self._fetched_at is None or now - self._fetched_at > self.cache_seconds
            rotated = jwk is None and now - (self._fetched_at or 0.0) >= self.min_refresh_seconds
            done, mine = None, False
            if stale or rotated or (jwk is None and self._in_flight is not None):
                done, mine = self._begin_fetch()
        if jwk is not None:
            if mine:  # stale: refreshed in the background while the cached key verifies
                threading.Thread(target=self._fetch, args=(done,), daemon=True, name="aex-jwks").start()
            return jwk
        if done is not None:
            if mine:
                self._fetch(done)  # the issuer may have rotated its keys
            elif not done.wait(self.refresh_wait_seconds):
                raise UnauthenticatedError("the identity provider's keys are being fetched and did not arrive in time")
        with self._lock:
            jwk, failure, known = self._lookup(kid), self._failure, bool(self._keys)
        if jwk is None:
            if failure is not None and not known:
                raise UnauthenticatedError(failure.message)
            raise UnauthenticatedError("the token is signed with a key the identity provider does not publish")
        return jwk

    # --- tokens ------------------------------------------------------------------------
    def authenticate(self, token: str) -> Principal:
        """The principal of a valid OIDC token; UnauthenticatedError otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise UnauthenticatedError("the bearer token is not a valid API key or OIDC token") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise UnauthenticatedError(f"OIDC tokens signed with {alg!r} are not accepted")
        jwk = self._key_for(header.get("kid"))
        if KEY_TYPES.get(str(alg)[:2]) != jwk.get("kty") or jwk.get("alg", alg) != alg:
            raise UnauthenticatedError("the token's algorithm does not match its key")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise UnauthenticatedError("the OIDC token has expired") from None
        except jwt.InvalidAudienceError:
            raise UnauthenticatedError("the OIDC token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise UnauthenticatedError("the OIDC token is from another issuer") from None
        except jwt.PyJWTError as exc:
            raise UnauthenticatedError(f"the OIDC token is not valid ({type(exc).__name__})") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise UnauthenticatedError("the OIDC token has no subject")
        tenant = None
        if self.tenant_claim:
            tenant = claim(claims, self.tenant_claim)
            if not isinstance(tenant, str) or not tenant:
                raise UnauthenticatedError(f"the OIDC token has no {self.tenant_claim!r} claim (the tenant)")
        scopes = scopes_of(claim(claims, self.scopes_claim))
        return Principal(kind="oidc", id=subject, tenant=tenant, scopes=scopes)
