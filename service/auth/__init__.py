"""Who is asking: principals and scopes, API keys in Redis, OIDC bearer tokens, and the guard the routes declare.

``requires(scope)`` is the FastAPI dependency a route declares; it answers with the
``Principal`` or raises ``unauthenticated`` (401) / ``forbidden`` (403). The app factory builds
one ``Authenticator`` (``Authenticator.from_settings``) after ``check_auth_settings``. Torch-free.
"""

from __future__ import annotations

from service.auth.apikeys import ApiKeyStore, new_token, token_digest
from service.auth.guard import (
    Acting,
    Authenticator,
    acting,
    challenge,
    check_auth_settings,
    confirm_before_answering,
    current_principal,
    requires,
)
from service.auth.oidc import OidcVerifier
from service.auth.principal import (
    ALL_SCOPES,
    LOCAL,
    Principal,
    Scope,
    can_access,
    owner_of_meta,
    require,
    reuse_scope,
)

__all__ = [
    "ALL_SCOPES",
    "LOCAL",
    "Acting",
    "ApiKeyStore",
    "Authenticator",
    "OidcVerifier",
    "Principal",
    "Scope",
    "acting",
    "can_access",
    "challenge",
    "check_auth_settings",
    "confirm_before_answering",
    "current_principal",
    "new_token",
    "owner_of_meta",
    "require",
    "requires",
    "reuse_scope",
    "token_digest",
]
