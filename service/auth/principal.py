"""Principals (who asks: an API key, an OIDC subject, or the local user when auth is off), their scopes and job ownership.

A job belongs to the principal that submitted it: ``owner_meta(principal)`` goes into
``job.meta["owner"]`` and ``can_access`` compares it (``admin`` sees every job). Result reuse
stays within ``reuse_scope(principal)``: the tenant when the principal has one, else the
principal itself. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from models.errors import ForbiddenError


class Scope(str, Enum):
    SUBMIT = "submit"  # POST /v1/classify, /v1/explain
    READ = "read"  # GET /v1/models, own jobs, their images and DICOM objects, DELETE own jobs
    ADMIN = "admin"  # keys, the audit trail, every job; implies every other scope
    METRICS = "metrics"  # GET /metrics


ALL_SCOPES: frozenset[str] = frozenset(s.value for s in Scope)

PrincipalKind = Literal["key", "oidc", "local"]


@dataclass(frozen=True)
class Principal:
    """Who made a request. ``id``: the key name, or the OIDC subject; ``tenant``: the OIDC
    tenant claim (None for keys and when AEX_OIDC_TENANT_CLAIM is unset); ``uid``: what tells
    apart two keys given the same name one after the other (a key created after another of its
    name was revoked does not inherit that one's jobs)."""

    kind: PrincipalKind
    id: str
    tenant: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    uid: str | None = None

    def has(self, scope: Scope | str) -> bool:
        value = scope.value if isinstance(scope, Scope) else scope
        return value in self.scopes or Scope.ADMIN.value in self.scopes

    @property
    def label(self) -> str:
        """How the audit trail and the logs name the principal (``key:alice``,
        ``oidc:<subject>@<tenant>``): an identifier of staff or a client, never of a patient."""
        return f"{self.kind}:{self.id}" + (f"@{self.tenant}" if self.tenant else "")


# The principal of every request when AEX_AUTH=off (the API then listens on loopback only).
LOCAL = Principal(kind="local", id="local", tenant=None, scopes=ALL_SCOPES)


def require(principal: Principal, scope: Scope | str) -> Principal:
    """``principal`` when it holds ``scope`` (or ``admin``); else ForbiddenError."""
    if not principal.has(scope):
        value = scope.value if isinstance(scope, Scope) else scope
        raise ForbiddenError(f"this token lacks the {value!r} scope")
    return principal


def owner_meta(principal: Principal) -> dict[str, Any]:
    """What a job stores in ``job.meta["owner"]``: kind, id, tenant (and uid) of its submitter."""
    owner = {"kind": principal.kind, "id": principal.id, "tenant": principal.tenant}
    return {**owner, "uid": principal.uid} if principal.uid else owner


def owner_of_meta(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The owner a job's meta names (None for a job without one)."""
    owner = meta.get("owner") if isinstance(meta, dict) else None
    return owner if isinstance(owner, dict) else None


def can_access(principal: Principal, owner: dict[str, Any] | None) -> bool:
    """Whether ``principal`` may see (view, download, cancel) a job owned by ``owner``:
    its own jobs, and every job for ``admin``. A job without an owner is admin's alone."""
    if principal.has(Scope.ADMIN):
        return True
    return owner is not None and owner == owner_meta(principal)


def owner_digest(principal: Principal) -> str:
    """A stable digest of the principal (for Redis key names: no identity spelled out)."""
    text = json.dumps(owner_meta(principal), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def reuse_scope(principal: Principal) -> str:
    """The scope result reuse stays within, as a digest to mix into the result cache key:
    the tenant (every principal of one OIDC tenant) when there is one, else the principal."""
    if principal.tenant:
        text = json.dumps({"kind": principal.kind, "tenant": principal.tenant}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]
    return owner_digest(principal)
