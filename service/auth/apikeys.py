"""API keys: created, listed and revoked by name, stored in Redis as the SHA-256 of their token, never the token.

A token is ``aex_`` + 43 characters of URL-safe base64 (32 random bytes), shown once when the
key is created. Redis holds, per key, the hash ``api_key_key(name)`` (digest, scopes,
created_at, a random uid that tells this key from a later one of the same name) and the index ``api_key_digest_key(digest) -> name`` that each request looks its
token up by; the digest of a 256-bit random token cannot be turned back into the token, so
a Redis dump holds nothing to authenticate with. The final check compares digests in
constant time. Torch-free.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime
from typing import Any

from redis import Redis

from jobs.keys import api_key_digest_key, api_key_key, api_key_names_key
from models.errors import BadParameterError, KeyExistsError, UnauthenticatedError, UnknownKeyError
from service.auth.principal import ALL_SCOPES, Principal, Scope

TOKEN_PREFIX = "aex_"
TOKEN_PATTERN = re.compile(r"^aex_[A-Za-z0-9_-]{43}$")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
FIRST_ADMIN = "admin"


def new_token() -> str:
    """A new API key token: ``aex_`` + URL-safe base64 of 32 random bytes."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


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


class ApiKeyStore:
    """API keys on one Redis connection."""

    def __init__(self, conn: Redis):
        self.conn = conn

    def create(self, name: str, scopes, token: str | None = None) -> tuple[dict[str, Any], str]:
        """Create key ``name`` with ``scopes``; returns (its listing, the token). The token is
        not kept: it cannot be shown again. KeyExistsError when the name is taken. ``token``:
        the token to give it (only to restore a key its holder still has; default: a new one)."""
        name, values = check_name(name), check_scopes(scopes)
        if token is not None and not TOKEN_PATTERN.match(token):
            raise BadParameterError("a restored token must be an aex API key token (aex_ + 43 characters)")
        token = token or new_token()
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
            pipe.execute()

    def exists(self) -> bool:
        """Whether any key exists."""
        return bool(self.conn.scard(api_key_names_key()))

    def authenticate(self, token: str) -> Principal:
        """The principal of an API key token; UnauthenticatedError for an unknown or revoked one."""
        if not TOKEN_PATTERN.match(token or ""):
            raise UnauthenticatedError("the bearer token is not a valid API key or OIDC token")
        digest = token_digest(token)
        name = self.conn.get(api_key_digest_key(digest))
        if name is None:
            raise UnauthenticatedError("unknown or revoked API key")
        name = _text(name)
        stored, scopes, uid = self.conn.hmget(api_key_key(name), ["digest", "scopes", "uid"])
        if stored is None or not hmac.compare_digest(_text(stored).encode(), digest.encode()):
            raise UnauthenticatedError("unknown or revoked API key")
        return Principal("key", name, None, frozenset(_text(scopes).split()), uid=_text(uid) or None)

    def ensure_first_admin(self, token: str | None = None) -> str | None:
        """When no key exists, create ``admin`` with every scope and return its token (for
        ``aex serve`` to write to AEX_TOKEN_FILE); else None. ``token``: the one to give it
        (``aex serve`` restoring its first admin in its embedded Redis, restarted empty)."""
        if self.exists():
            return None
        try:
            _, token = self.create(FIRST_ADMIN, sorted(ALL_SCOPES), token=token)
        except KeyExistsError:
            return None  # another process made it meanwhile
        return token
