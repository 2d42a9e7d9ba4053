"""Administration (the ``admin`` scope): API keys (create, list, revoke) and the audit trail.

A key's token is answered once, when it is created; Redis keeps only its digest. Every call
is recorded in the audit trail by its middleware (``POST /v1/keys``, ``DELETE
/v1/keys/{name}``, ...), refused ones included; the trail itself is read as JSON lines."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from models.errors import BadParameterError
from service.audit import AuditLog, to_json_lines
from service.auth import ApiKeyStore, Scope, requires
from service.deps import SettingsDep
from service.multipart import read_json
from service.schemas import ERRORS, ErrorResponse

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[requires(Scope.ADMIN)])

ADMIN_ERRORS = {**ERRORS, 409: {"model": ErrorResponse}}
MAX_KEY_BODY_BYTES = 4096


class NewKey(BaseModel):
    """``POST /v1/keys``: the key's name and its scopes."""

    name: str = Field(description="lower-case letters, digits, '_', '.' or '-' (1 to 64)", max_length=64)
    scopes: list[str] = Field(description="one or more of submit, read, admin (every scope), metrics", max_length=4)


class KeyListing(BaseModel):
    name: str
    scopes: list[str]
    created_at: str


class CreatedKey(KeyListing):
    token: str = Field(description="the bearer token: shown this once, never again")


class KeyList(BaseModel):
    keys: list[KeyListing]


class RevokedKey(BaseModel):
    name: str
    revoked: bool


def _keys(request: Request) -> ApiKeyStore:
    return request.app.state.auth.keys


def _audit(request: Request) -> AuditLog:
    return request.app.state.audit


@router.post(
    "/keys",
    status_code=201,
    response_model=CreatedKey,
    responses=ADMIN_ERRORS,
    # The body is read by the route, after the token was checked (FastAPI would read it first).
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": NewKey.model_json_schema()}}}
    },
)
async def create_key(request: Request, settings: SettingsDep) -> JSONResponse:
    """Create an API key with its scopes; the answer holds its token, shown this once."""
    try:
        body = NewKey.model_validate(await read_json(request, settings, MAX_KEY_BODY_BYTES))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise BadParameterError(problems) from None
    listing, token = await run_in_threadpool(_keys(request).create, body.name, body.scopes)
    return JSONResponse({**listing, "token": token}, status_code=201, headers={"Cache-Control": "no-store"})


@router.get("/keys", response_model=KeyList, responses=ERRORS)
def list_keys(request: Request) -> dict:
    """Every API key: name, scopes and creation time (never a token, nor its digest)."""
    return {"keys": _keys(request).list()}


@router.delete("/keys/{name}", response_model=RevokedKey, responses=ERRORS)
def revoke_key(request: Request, name: str) -> dict:
    """Revoke an API key: its token stops working at once."""
    _keys(request).revoke(name)
    return {"name": name, "revoked": True}


@router.get(
    "/audit",
    response_class=Response,
    responses={200: {"content": {"application/x-ndjson": {}}, "description": "one JSON record a line"}, **ERRORS},
)
def read_audit(
    request: Request,
    since: Annotated[
        str | None, Query(description="15m, 1h, 7d, an ISO 8601 time, or a record id to read on after", max_length=64)
    ] = None,
    until: Annotated[str | None, Query(description="the same forms as since (default: now)", max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="most records to answer")] = 1000,
) -> Response:
    """The audit trail, oldest first, as JSON lines: time, principal, action, job id, model,
    input sha256 and HTTP status of each access."""
    records = _audit(request).read(since=since, until=until, limit=limit)
    return Response(to_json_lines(records), media_type="application/x-ndjson")
