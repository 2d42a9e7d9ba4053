"""Tokens and keys of the test stacks: one data key and one callback secret for the whole
session (the API and every worker of a stack share them, as in production), and API keys made
in a stack's Redis for the test clients (authentication is on, as by default)."""

from __future__ import annotations

import contextlib

from jobs.crypto import generate_data_key
from jobs.queues import connect
from jobs.webhooks import generate_callback_secret
from models.errors import UnauthenticatedError, UnknownKeyError
from service.auth import ApiKeyStore

DATA_KEY = generate_data_key()
CALLBACK_SECRET = generate_callback_secret()
ADMIN = "tests-admin"

_tokens: dict[tuple[str, str], str] = {}


def token_for(settings, name: str = ADMIN, scopes=("admin",)) -> str:
    """A token of key ``name`` in the Redis of ``settings``: the one made earlier in the
    session while it still works there, else a new key (an earlier one of that name revoked)."""
    conn = connect(settings.redis_url)
    try:
        store = ApiKeyStore(conn)
        cached = _tokens.get((settings.redis_url, name))
        if cached is not None:
            with contextlib.suppress(UnauthenticatedError):
                store.authenticate(cached)
                return cached
        with contextlib.suppress(UnknownKeyError):
            store.revoke(name)
        _, token = store.create(name, list(scopes))
        _tokens[(settings.redis_url, name)] = token
        return token
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def auth_headers(settings, name: str = ADMIN, scopes=("admin",)) -> dict[str, str]:
    """``Authorization: Bearer`` with the token of key ``name`` (default: an admin key)."""
    return bearer(token_for(settings, name, scopes))


def api_client(settings, name: str = ADMIN, scopes=("admin",), **kwargs):
    """A TestClient on a new app with ``settings``, sending the token of key ``name``
    (enter it with ``with``)."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    return TestClient(create_app(settings), headers=auth_headers(settings, name, scopes), **kwargs)
