"""API keys: created, listed and revoked by name, stored in Redis as the SHA-256 of their token, never the token.

A token is ``aex_``, the 8 hex digits of the store epoch it was made in (``jobs.epoch``), ``_``,
43 characters of URL-safe base64 (32 random bytes) and 4 hex check digits (of all before them):
60 characters, shown once when the key is created. A token no key answers to whose check digits
hold and whose epoch is not the store's was lost with the store's data (Redis restarted without
persistence, or emptied): ``key_lost`` (401), not "unknown or revoked". That tells a caller only
what the token itself says (its epoch is not the store's), never whether a key existed; a key
is never made again with an earlier token, so a revoked key stays revoked. Tokens of the earlier
form (``aex_`` + 43 characters, no epoch) keep working; lost, they are only "unknown".
Redis holds, per key, the hash ``api_key_key(name)`` (digest, scopes,
created_at, a random uid that tells this key from a later one of the same name) and the index ``api_key_digest_key(digest) -> name`` that each request looks its
token up by; the digest of a 256-bit random token cannot be turned back into the token, so
a Redis dump holds nothing to authenticate with. The final check compares digests in
constant time.

Lookups are cached (``authenticate_cached``) for AUTH_CACHE_SECONDS, each with the keys'
revision (``api_keys_revision_key``: +1 in the same transaction as every creation and
revocation) read before it: a cached principal serves a request only once that revision is
confirmed unchanged in the request's first round trip (the guard's: with the pending audit
record of a mutating request, alone for a read), so a revoked key is refused from the very
next request on, and an unchanged one costs no lookup. Torch-free.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from datetime import UTC, datetime
from typing import Any

from redis import Redis

from jobs.epoch import CHECK_DIGITS, EPOCH_DIGITS, check_digits, checked, store_epoch
from jobs.keys import api_key_digest_key, api_key_key, api_key_names_key, api_keys_revision_key
from models.errors import BadParameterError, KeyExistsError, KeyLostError, UnauthenticatedError, UnknownKeyError
from service.auth.principal import ALL_SCOPES, Principal, Scope

TOKEN_PREFIX = "aex_"
# aex_<epoch>_<secret><check>, or the earlier form aex_<secret> (no epoch).
TOKEN_PATTERN = re.compile(r"^aex_(?:[0-9a-f]{8}_[A-Za-z0-9_-]{43}[0-9a-f]{4}|[A-Za-z0-9_-]{43})$")
EPOCH_START = len(TOKEN_PREFIX)
TOKEN_LENGTH = EPOCH_START + EPOCH_DIGITS + 1 + 43 + CHECK_DIGITS  # 60; the earlier form is 47
KEY_LOST = (
    "this API key was lost: the job store (Redis) lost its data after the key was made "
    "(restarted without persistence, or emptied); ask an admin for a new key"
)
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
FIRST_ADMIN = "admin"


def new_token(epoch: str) -> str:
    """A new API key token of store epoch ``epoch``: ``aex_<epoch>_`` + URL-safe base64 of 32
    random bytes + 4 hex check digits."""
    body = f"{TOKEN_PREFIX}{epoch}_{secrets.token_urlsafe(32)}"
    return body + check_digits(body)


def token_epoch(token: str) -> str | None:
    """The store epoch ``token`` was made in; None for a token of the earlier form (or one
    whose check digits do not hold: mistyped, not made by aex)."""
    if len(token) != TOKEN_LENGTH or not TOKEN_PATTERN.match(token) or not checked(token):
        return None
    return token[EPOCH_START : EPOCH_START + EPOCH_DIGITS]


def token_digest(token: str) -> str:
    """SHA-256 (hex) of a token, as stored (the domain prefix keeps it apart from other hashes)."""
    return hashlib.sha256(b"aex api key\x00" + token.encode()).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise BadParameterError(
            "a key name is 1 to 64 characters: lower-case letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def check_scopes(scopes) -> list[str]:
    if isinstance(scopes, str):
        scopes = scopes.replace(",", " ").split()
    values = sorted({str(s).strip().lower() for s in scopes or [] if str(s).strip()})
    bad = sorted(set(values) - ALL_SCOPES)
    if bad or not values:
        raise BadParameterError(
            f"scopes must be one or more of {', '.join(s.value for s in Scope)}"
            + (f" (not {', '.join(repr(b) for b in bad)})" if bad else "")
        )
    return values


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


# How long a looked-up key serves requests from memory (each still confirms the revision).
AUTH_CACHE_SECONDS = 5.0
AUTH_CACHE_ENTRIES = 10_000


class ApiKeyStore:
    """API keys on one Redis connection, with the cache of this process's lookups."""

    def __init__(self, conn: Redis):
        self.conn = conn
        self._cache: dict[str, tuple[Principal, str, float]] = {}  # digest -> (principal, revision, until)
        self._lock = threading.Lock()

    def create(self, name: str, scopes) -> tuple[dict[str, Any], str]:
        """Create key ``name`` with ``scopes``; returns (its listing, the token). The token is
        new (never one given: an earlier token, perhaps revoked, can never come back) and not
        kept: it cannot be shown again. KeyExistsError when the name is taken."""
        name, values = check_name(name), check_scopes(scopes)
        token = new_token(store_epoch(self.conn))
        digest = token_digest(token)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        # The name is claimed atomically: two creations of one name cannot both succeed.
        if not self.conn.hsetnx(api_key_key(name), "digest", digest):
            raise KeyExistsError(f"an API key named {name!r} exists already (revoke it first)")
        with self.conn.pipeline() as pipe:
            pipe.hset(
                api_key_key(name),
                mapping={"scopes": " ".join(values), "created_at": created, "uid": secrets.token_hex(8)},
            )
            pipe.set(api_key_digest_key(digest), name)
            pipe.sadd(api_key_names_key(), name)
            pipe.incr(api_keys_revision_key())
            pipe.execute()
        return {"name": name, "scopes": values, "created_at": created}, token

    def list(self) -> list[dict[str, Any]]:
        """Every key: name, scopes, created_at (never a token or its digest)."""
        names = sorted(_text(n) for n in self.conn.smembers(api_key_names_key()))
        with self.conn.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(api_key_key(name), ["scopes", "created_at"])
            rows = pipe.execute()
        return [
            {"name": name, "scopes": _text(scopes).split(), "created_at": _text(created)}
            for name, (scopes, created) in zip(names, rows)
            if scopes is not None
        ]

    def revoke(self, name: str) -> None:
        """Delete key ``name``: its token stops working at once. UnknownKeyError when absent."""
        check_name(name)
        digest = self.conn.hget(api_key_key(name), "digest")
        if digest is None:
            raise UnknownKeyError(f"no API key is named {name!r}")
        with self.conn.pipeline() as pipe:
            pipe.delete(api_key_key(name), api_key_digest_key(_text(digest)))
            pipe.srem(api_key_names_key(), name)
            pipe.incr(api_keys_revision_key())  # every cached lookup is checked again
            pipe.execute()
        with self._lock:
            self._cache.clear()

    def exists(self) -> bool:
        """Whether any key exists."""
        return bool(self.conn.scard(api_key_names_key()))

    def authenticate(self, token: str) -> Principal:
        """The principal of an API key token; UnauthenticatedError for an unknown or revoked
        one, KeyLostError (a subclass) for one of an earlier store epoch."""
        return self.authenticate_cached(token, cached=False)[0]

    def authenticate_cached(self, token: str, cached: bool = True) -> tuple[Principal, str | None]:
        """``authenticate``, answered from this process's cache when the token was looked up
        in the last AUTH_CACHE_SECONDS: (principal, the keys' revision the caller must confirm
        unchanged before serving the request: ``revision_holds``), or (principal, None) when it
        was looked up now (nothing to confirm)."""
        if not TOKEN_PATTERN.match(token or ""):
            raise UnauthenticatedError("the bearer token is not a valid API key or OIDC token")
        digest = token_digest(token)
        now = time.monotonic()
        hit = self._cache.get(digest) if cached else None
        if hit is not None and hit[2] > now:
            return hit[0], hit[1]
        return self._look_up(token, digest, now)

    def from_cache(self, token: str) -> tuple[Principal, str] | None:
        """``authenticate_cached``'s answer when the cache has it (no I/O: for the event
        loop), else None."""
        if not TOKEN_PATTERN.match(token or ""):
            return None
        hit = self._cache.get(token_digest(token))
        return (hit[0], hit[1]) if hit is not None and hit[2] > time.monotonic() else None

    def _look_up(self, token: str, digest: str, now: float) -> tuple[Principal, None]:
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.get(api_keys_revision_key())  # read first: a change after it is seen later
            pipe.get(api_key_digest_key(digest))
            revision, name = pipe.execute()
        if name is None:
            self._refuse(token)
        name = _text(name)
        stored, scopes, uid = self.conn.hmget(api_key_key(name), ["digest", "scopes", "uid"])
        if stored is None or not hmac.compare_digest(_text(stored).encode(), digest.encode()):
            self._refuse(token)
        principal = Principal("key", name, None, frozenset(_text(scopes).split()), uid=_text(uid) or None)
        with self._lock:
            if len(self._cache) >= AUTH_CACHE_ENTRIES:
                self._cache.clear()
            self._cache[digest] = (principal, _text(revision), now + AUTH_CACHE_SECONDS)
        return principal, None

    def revision_holds(self, revision: str) -> bool:
        """Whether the keys are unchanged since ``revision`` (one round trip); when they are
        not, every cached lookup is dropped."""
        if _text(self.conn.get(api_keys_revision_key())) == revision:
            return True
        self.forget()
        return False

    def forget(self) -> None:
        """Drop every cached lookup (the keys changed)."""
        with self._lock:
            self._cache.clear()

    def _refuse(self, token: str) -> None:
        """Raise for a token no key answers to: ``key_lost`` when it was made in an earlier
        store epoch (it says so itself), else ``unauthenticated``."""
        epoch = token_epoch(token)
        if epoch is not None and epoch != store_epoch(self.conn):
            raise KeyLostError(KEY_LOST)
        raise UnauthenticatedError("unknown or revoked API key")

    def ensure_first_admin(self) -> str | None:
        """When no key exists, create ``admin`` with every scope and return its token (for
        ``aex serve`` to write to AEX_TOKEN_FILE); else None. The token is always a new one."""
        if self.exists():
            return None
        try:
            _, token = self.create(FIRST_ADMIN, sorted(ALL_SCOPES))
        except KeyExistsError:
            return None  # another process made it meanwhile
        return token
