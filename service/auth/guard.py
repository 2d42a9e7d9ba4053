"""The guard: the Authenticator of the app (API keys and OIDC, or none when AEX_AUTH=off), the start-up check of the auth settings, and the ``requires(scope)`` dependency of the routes.

A route declares ``principal: Annotated[Principal, requires(Scope.READ)]`` (or
``dependencies=[requires(Scope.METRICS)]``); the principal is authenticated once per request
(``request.state.principal``, which the audit trail reads). A missing or invalid token is
``unauthenticated`` (401: the app adds ``WWW-Authenticate: challenge(request)``), a valid one
without the scope ``forbidden`` (403). A principal that holds the scope of a mutating route
(POST, DELETE) has its pending audit record written before the route acts
(``service.audit.before_acting``): a store that refuses it refuses the request (503).

An API key token made before the job store lost its data is ``key_lost`` (401), except on a
job route (``/v1/jobs/{job_id}...``) whose job id is of an earlier epoch too: that job is
``job_lost`` (410), as it is for any token, since the id alone says so (``jobs.epoch``).

The job store being unreachable or refusing while an API key is looked up is never a 401:
the Redis error goes on to the app's handler (503 ``store_unavailable``), and nothing is
served without a principal. Torch-free.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from redis import Redis
from starlette.concurrency import run_in_threadpool

from jobs.epoch import lost_in_restart
from models.errors import BadParameterError, ForbiddenError, JobLostError, KeyLostError, UnauthenticatedError
from service.audit import before_acting, owed_record
from service.auth.apikeys import TOKEN_PREFIX, ApiKeyStore
from service.auth.oidc import OidcVerifier, check_fetch_url
from service.auth.principal import LOCAL, Principal, Scope, require
from service.timing import stage

log = logging.getLogger("aex.auth")

MAX_AUTHORIZATION_LENGTH = 8192
NO_TOKEN = (
    "this request needs an Authorization: Bearer <token> header "
    "(`aex serve` printed where its first token is; `aex keys create` makes more)"
)


def is_loopback_host(host: str) -> bool:
    """Whether the API's listen address ``host`` is loopback only (127.0.0.0/8, ::1, localhost)."""
    host = (host or "").strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth_settings(settings: Any) -> None:
    """Refuse settings that would open the service (the app factory calls this first):
    AEX_AUTH=off on an address other than loopback, half an OIDC configuration. AEX_AUTH=off
    on loopback is accepted and logged as a warning, loudly."""
    if settings.auth == "off":
        if not is_loopback_host(settings.host):
            raise BadParameterError(
                f"AEX_AUTH=off is accepted only when the API listens on a loopback address, not {settings.host!r}: "
                "anyone who reaches the port could read every job; keep AEX_AUTH=on (the default) or set AEX_HOST=127.0.0.1"
            )
        log.warning(
            "AUTHENTICATION IS OFF (AEX_AUTH=off): every request to http://%s:%d is served without a token, "
            "as one local user with every scope. Only for a single-user machine; never with patient data on a shared one.",
            settings.host,
            settings.port,
        )
    if bool(settings.oidc_issuer) != bool(settings.oidc_audience):
        raise BadParameterError("OIDC needs both AEX_OIDC_ISSUER and AEX_OIDC_AUDIENCE (or neither)")
    if settings.oidc_issuer:
        if settings.oidc_jwks_url:
            check_fetch_url(settings.oidc_jwks_url, "AEX_OIDC_JWKS_URL")
        else:
            check_fetch_url(settings.oidc_issuer, "AEX_OIDC_ISSUER (its keys are discovered from it)")


class Authenticator:
    """Turns an ``Authorization`` header into a Principal. ``enabled`` False: everyone is
    the local user (AEX_AUTH=off, accepted on loopback only)."""

    def __init__(self, enabled: bool, keys: ApiKeyStore | None = None, oidc: OidcVerifier | None = None):
        self.enabled, self.keys, self.oidc = enabled, keys, oidc

    @classmethod
    def from_settings(cls, settings: Any, conn: Redis) -> Authenticator:
        oidc = OidcVerifier.from_settings(settings) if settings.oidc_issuer else None
        return cls(settings.auth == "on", ApiKeyStore(conn), oidc)

    def authenticate(self, authorization: str | None) -> Principal:
        return self.authenticate_cached(authorization, cached=False)[0]

    def from_cache(self, authorization: str | None) -> tuple[Principal, str | None] | None:
        """``authenticate_cached``'s answer when it needs no I/O (authentication off, an API
        key in the cache): for the event loop; None when it needs a lookup (or an error)."""
        if not self.enabled:
            return LOCAL, None
        scheme, _, token = (authorization or "").strip().partition(" ")
        if self.keys is None or scheme.lower() != "bearer" or len(authorization or "") > MAX_AUTHORIZATION_LENGTH:
            return None
        return self.keys.from_cache(token.strip())

    def authenticate_cached(self, authorization: str | None, cached: bool = True) -> tuple[Principal, str | None]:
        """(principal, the API keys' revision to confirm before serving: a cached API key
        lookup's, ``ApiKeyStore.authenticate_cached``; None when there is nothing to confirm)."""
        if not self.enabled:
            return LOCAL, None
        if not authorization:
            raise UnauthenticatedError(NO_TOKEN)
        if len(authorization) > MAX_AUTHORIZATION_LENGTH:
            raise UnauthenticatedError("the Authorization header is too long")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("the Authorization header must be 'Bearer <token>'")
        if token.startswith(TOKEN_PREFIX) and self.keys is not None:
            return self.keys.authenticate_cached(token, cached=cached)
        if self.oidc is not None and token.count(".") == 2:
            return self.oidc.authenticate(token), None
        raise UnauthenticatedError("the bearer token is not a valid API key or OIDC token")


def current_principal(request: Request, cached: bool = True) -> Principal:
    """The request's principal, authenticated once (kept in ``request.state.principal``;
    ``request.state.auth_revision``: the API keys' revision a cached lookup must be confirmed
    at, ``requires``)."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        auth: Authenticator = request.app.state.auth
        try:
            with stage("auth"):
                principal, revision = auth.authenticate_cached(request.headers.get("authorization"), cached=cached)
        except KeyLostError:
            # Its owner polling a job lost with the key learns that the job is lost: the id
            # alone says so (its check digits hold, its epoch is not the store's), so this
            # tells nothing a caller could not work out; any other id stays a key_lost.
            job_id = request.path_params.get("job_id")
            if isinstance(job_id, str) and auth.keys is not None and lost_in_restart(auth.keys.conn, job_id):
                raise JobLostError(
                    f"job {job_id} is gone: the job store (Redis) lost its data after the job was accepted "
                    "(restarted without persistence, or emptied), and the key that submitted it with it"
                ) from None
            raise
        request.state.principal, request.state.auth_revision = principal, revision
    return principal


@dataclass
class Acting:
    """What a request still owes the store before it acts, for a route that sends it with its
    own first round trips (``requires(..., with_first_write=True)``): ``revision``, the API
    keys' revision its cached principal must be confirmed at (None: nothing, or confirmed
    already), read with the route's first reads; ``pending``, the command writing its pending
    audit record (``service.audit.owed_record``; None: none owed), the first of its first
    write. When the keys changed, ``keys_changed`` looks the key up again (a revoked one
    raises the 401). A request answered before its first reads (a refused upload) confirms
    its principal on its own first (``confirm``): nothing is answered to a revoked key."""

    revision: str | None
    pending: list[str] | None
    keys_changed: Callable[[], Principal]
    holds: Callable[[str], bool]

    def confirmed(self, revision: str | None) -> Principal | None:
        """After the keys' revision was read (``revision``): None when it is the one
        expected, else the principal looked up again (or its 401)."""
        expected, self.revision = self.revision, None
        return None if expected is None or revision == expected else self.keys_changed()

    def confirm(self) -> None:
        """Confirm the cached principal on its own (one round trip; nothing when confirmed)."""
        if self.revision is not None and not self.holds(self.revision):
            self.revision = None
            self.keys_changed()
        self.revision = None


async def confirm_before_answering(request: Request) -> None:
    """For a route that confirms its cached principal itself (``Acting``) and answers before
    it did (an error): confirm it now, in the thread pool; a revoked key's 401 replaces the
    answer."""
    owed = acting(request)
    if owed is not None and owed.revision is not None:
        await run_in_threadpool(owed.confirm)


def acting(request: Request) -> Acting | None:
    """What the request owes before it acts (``Acting``), when its route's guard left it to the route."""
    return getattr(request.state, "acting", None)


def requires(scope: Scope | str, with_first_write: bool = False):
    """The FastAPI dependency of a route that needs ``scope``: answers with the Principal.
    A principal from the key cache is confirmed before the route runs: in the same round trip
    as a mutating request's pending audit record, else on its own; when the keys changed, the
    key is looked up again (a revoked one is refused now). ``with_first_write``: the route
    confirms the principal with its first reads and writes the pending record with its first
    write itself (``acting``), saving both round trips."""
    value = scope.value if isinstance(scope, Scope) else Scope(scope).value

    async def principal_with_scope(request: Request) -> Principal:
        # A submission whose key is in the cache owes nothing before its route runs: answered
        # here, in the event loop (no thread of the pool for a dependency that does no I/O).
        if with_first_write and getattr(request.state, "principal", None) is None:
            with stage("auth"):
                known = request.app.state.auth.from_cache(request.headers.get("authorization"))
            if known is not None and known[0].has(value):
                request.state.principal, request.state.auth_revision = known
                return owing(request, known[0])
        return await run_in_threadpool(looked_up, request)

    def scoped(request: Request, principal: Principal) -> Principal:
        """``principal`` when it holds the scope; a 403 only once a cached one is confirmed
        (a revoked key is answered 401, never told what it may not do)."""
        try:
            return require(principal, value)
        except ForbiddenError:
            revision = getattr(request.state, "auth_revision", None)
            if revision is not None and not request.app.state.auth.keys.revision_holds(revision):
                request.state.principal = request.state.auth_revision = None
                return require(current_principal(request, cached=False), value)
            raise

    def owing(request: Request, principal: Principal) -> Principal:
        """Leave to the route what the request owes before it acts (``Acting``)."""

        def keys_changed() -> Principal:
            request.state.principal = request.state.auth_revision = None
            return require(current_principal(request, cached=False), value)

        keys = request.app.state.auth.keys
        holds = keys.revision_holds if keys is not None else (lambda _revision: True)
        revision = getattr(request.state, "auth_revision", None)
        request.state.acting = Acting(revision, owed_record(request), keys_changed, holds)
        return principal

    def looked_up(request: Request) -> Principal:
        principal = scoped(request, current_principal(request))
        revision = getattr(request.state, "auth_revision", None)
        if with_first_write:
            return owing(request, principal)

        with stage("audit"):
            # A mutating request's audit record, before it acts (with the revision, if any).
            held = before_acting(request, revision)
        if revision is not None and held is None:
            with stage("auth"):
                held = request.app.state.auth.keys.revision_holds(revision)
        if held is False:
            request.state.principal = request.state.auth_revision = None
            principal = require(current_principal(request, cached=False), value)
            with stage("audit"):
                before_acting(request)
        return principal

    principal_with_scope.__name__ = f"requires_{value}"
    return Depends(principal_with_scope)


def challenge(request: Request) -> str:
    """The ``WWW-Authenticate`` value of a 401 (RFC 6750): ``invalid_token`` when one was sent."""
    if request.headers.get("authorization"):
        return 'Bearer realm="aex", error="invalid_token"'
    return 'Bearer realm="aex"'
