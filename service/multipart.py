"""Reading a request body: the multipart form in memory with a size limit and a deadline, its
``image`` file part and its text fields (and a small JSON body, ``read_json``, the same way).

FastAPI's own form parsing spools files over 1 MB to a temporary file; an upload here never
touches the disk (the size limit bounds the memory it takes, AEX_BODY_TIMEOUT_SECONDS the
time). A body must end with its closing boundary: one cut short is refused, never parsed
into a form with defaulted fields.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from jobs.settings import Settings
from models.errors import BadParameterError, RequestTimeoutError, UploadTooLargeError

FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and the text fields

MAX_TEXT_FIELD_BYTES = 16 * 1024


@dataclass
class Upload:
    data: bytes
    filename: str | None
    fields: dict[str, str | list[str]] = field(default_factory=dict)  # a repeated field is a list
    content_type: str | None = None  # the file part's declared type

    @cached_property
    def sha256(self) -> str:
        """SHA-256 (hex) of the file: the cache key's input digest and the audit trail's."""
        return hashlib.sha256(self.data).hexdigest()


class _Parser(MultiPartParser):
    """starlette's multipart parser, noting whether the closing boundary arrived (python-
    multipart calls ``on_end`` only there; its ``finalize`` accepts a body cut short)."""

    complete = False

    def on_end(self) -> None:
        self.complete = True


def _too_large(limit: int) -> UploadTooLargeError:
    return UploadTooLargeError(f"the upload is over the limit of {limit} bytes (AEX_MAX_UPLOAD_BYTES)")


async def read_upload(request: Request, settings: Settings) -> Upload:
    """The ``image`` file and the text fields of a multipart/form-data request (a repeated
    text field is a list: ``service.schemas.parse_params`` decides whether it may be).

    Raises UploadTooLargeError (413) as soon as the body passes the limit,
    RequestTimeoutError (408) when the whole body has not arrived within
    AEX_BODY_TIMEOUT_SECONDS, and BadParameterError (400) for a body that is not multipart,
    is malformed or cut short (no closing boundary), or lacks the image."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise BadParameterError("send multipart/form-data with the image in a file field named 'image'")
    limit = settings.max_upload_bytes + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(settings.max_upload_bytes)

    async def limited():
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _too_large(settings.max_upload_bytes)
            yield chunk

    parser = _Parser(request.headers, limited(), max_files=1, max_fields=16, max_part_size=MAX_TEXT_FIELD_BYTES)
    parser.spool_max_size = limit + 1  # keep the file part in memory
    timeout = settings.body_timeout_seconds
    try:
        # One deadline over the whole body, however slowly its bytes trickle in (asyncio's
        # own: anyio's fail_after, a cancel scope, was about a tenth of the classify route's
        # time in the event loop, py-spy at 32 clients).
        async with asyncio.timeout(timeout):
            form = await parser.parse()
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive whole within {timeout:g} s (AEX_BODY_TIMEOUT_SECONDS)"
        ) from None
    except MultiPartException as exc:
        raise BadParameterError(f"malformed multipart body: {exc.message}") from None
    except ClientDisconnect:
        raise BadParameterError("the client closed the connection before the request body ended") from None
    if not parser.complete:
        await form.close()
        raise BadParameterError("malformed multipart body: it ends before its closing boundary (cut short?)")
    try:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            if form.get("pacs") is None:
                raise BadParameterError(
                    "the form has no file field named 'image' (or, for an instance in a PACS, the fields pacs, "
                    "study_uid, series_uid and instance_uid)"
                )
            image = None  # an input by reference: the worker fetches it
        data = await image.read() if image is not None else b""
        if len(data) > settings.max_upload_bytes:
            raise _too_large(settings.max_upload_bytes)
        fields: dict[str, str | list[str]] = {}
        for k, v in form.multi_items():
            if not isinstance(v, str):
                continue
            if k not in fields:
                fields[k] = v
            else:
                prev = fields[k]
                fields[k] = [*prev, v] if isinstance(prev, list) else [prev, v]
        if image is None:
            return Upload(data=b"", filename=None, fields=fields)
        return Upload(data=data, filename=image.filename, fields=fields, content_type=image.content_type)
    finally:
        await form.close()


async def read_json(request: Request, settings: Settings, limit: int) -> object:
    """A small JSON body (at most ``limit`` bytes, within AEX_BODY_TIMEOUT_SECONDS), read only
    once the route has authenticated the request: 413 beyond the limit, 400 for anything that
    is not JSON."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise BadParameterError("send the request as application/json")
    chunks, total = [], 0
    try:
        async with asyncio.timeout(settings.body_timeout_seconds):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise UploadTooLargeError(f"the request body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive whole within {settings.body_timeout_seconds:g} s"
        ) from None
    except ClientDisconnect:
        raise BadParameterError("the client closed the connection before the request body ended") from None
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise BadParameterError("the request body is not valid JSON") from None
