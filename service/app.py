"""The FastAPI application: ``create_app(settings)``; run it with
``uvicorn --factory service.app:create_app`` or ``aex serve``.

This process never imports torch: it validates uploads with Pillow (models.data.imaging, models.dicom.pixels), reads
checkpoint metadata from safetensors headers as JSON, and enqueues jobs by dotted path.

The trust boundary is set up here: the auth settings checked first (``service.auth``), the
authenticator every route's ``requires(scope)`` uses, the audit trail's middleware, the data
cipher (AEX_DATA_KEY: no key, no API) and the callback policy handed to the job service,
``WWW-Authenticate`` on every 401, CORS for the allowed origins only (AEX_CORS_ORIGINS), the
trusted ``Host`` values (AEX_TRUSTED_HOSTS), and ``/docs`` without any external load.

Errors are mapped here, at the root, not per route: the catalogue's by ``service.errors``; a
Redis error that means the store refuses or is unreachable (``service.errors.store_refusal``),
wherever it is raised (a route, the thread pool, the API key lookup of the guard), is 503
``store_unavailable`` with ``Retry-After``; any other exception, a plain Redis
``ResponseError`` included (a bug of ours), is 500 ``internal_error`` with a fixed message.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from jobs.callbacks import CallbackPolicy
from jobs.crypto import cipher_from_settings
from jobs.queues import REDIS_OUTAGE, check_store_policy, connect
from jobs.settings import Settings
from models.errors import AexError, BadParameterError, UnauthenticatedError
from models.version import __version__
from service.audit import AuditLog
from service.audit_answer import AuditMiddleware
from service.auth import Authenticator, challenge, check_auth_settings
from service.docs import install_docs
from service.errors import error_response, status_of, store_refusal, store_unavailable
from service.green import make_green
from service.jobs import Catalogue, JobService
from service.metrics import Metrics, MetricsMiddleware
from service.routes import admin as admin_routes
from service.routes import jobs as job_routes
from service.routes import models as model_routes
from service.routes import ops as ops_routes
from service.timing import ServerTimingMiddleware
from service.viewer import install_viewer

log = logging.getLogger("aex.service")

HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as ``{"error": {"code", "message"}}`` with its status."""

    @app.exception_handler(AexError)
    async def aex_error(request: Request, exc: AexError):
        resp = error_response(status_of(exc.code), exc.code, exc.message)
        if isinstance(exc, UnauthenticatedError):  # key_lost too: every 401 names its scheme
            resp.headers["WWW-Authenticate"] = challenge(request)
        return resp

    @app.exception_handler(RedisError)
    async def redis_error(request: Request, exc: RedisError):
        return unexpected_error(request.method, request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(status_of(BadParameterError.code), BadParameterError.code, problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return unexpected_error(request.method, request.url.path, exc)

    app.add_middleware(InternalErrorMiddleware)  # before any other: the innermost


def unexpected_error(method: str, path: str, exc: Exception) -> JSONResponse:
    """The answer to an exception that is not one of the catalogue's: 503 ``store_unavailable``
    (with ``Retry-After``) when it is the job store refusing or unreachable, wherever it was
    raised (a route, the thread pool, the auth dependency looking up an API key), else
    ``internal_error``. The log names the refusal, never the Redis error's text."""
    what = store_refusal(exc)
    if what is None:
        return internal_error(method, path, exc)
    log.error("the job store refused %s %s: %s (%s)", method, path, what, type(exc).__name__)
    err = store_unavailable(what)
    return error_response(status_of(err.code), err.code, err.message)


def internal_error(method: str, path: str, exc: Exception) -> JSONResponse:
    """The answer to an exception no handler took: 500 ``internal_error`` with a fixed message
    and an error id, never the exception's text (it may quote the upload: patient data). The
    log keeps the id, the exception's class and its stack, not its text."""
    error_id = uuid.uuid4().hex
    stack = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unhandled error %s in %s %s: %s\n%s", error_id, method, path, type(exc).__name__, stack)
    return error_response(
        500,
        "internal_error",
        f"an unexpected error occurred in the API; quote error id {error_id} to its operators",
        error_id=error_id,
    )


class InternalErrorMiddleware:
    """Pure ASGI middleware inside every other: an exception no handler took is answered with
    ``unexpected_error`` here, so it is not raised on to the server, whose log would print its
    text (Starlette re-raises after its own 500 handler). One raised after the response has
    started can only be raised on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if started:
                raise
            await unexpected_error(scope.get("method", ""), scope.get("path", ""), exc)(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. ``settings``: None reads AEX_* from the environment, once. Refuses
    settings that would open the service (AEX_AUTH=off off loopback), and a missing or
    malformed AEX_DATA_KEY. Its start (lifespan) refuses a Redis that evicts keys."""
    settings = settings or Settings()
    check_auth_settings(settings)
    if not settings.redis_url:
        raise BadParameterError("AEX_REDIS_URL is not set (`aex serve` starts an embedded Redis and sets it)")
    cipher = cipher_from_settings(settings.data_key)
    policy = CallbackPolicy.from_settings(settings)
    conn = connect(settings.redis_url, socket_timeout=settings.classify_wait_seconds + 10.0)
    green = make_green(conn)  # before its first connection: submissions then run in the loop

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # Refuse to start on a Redis that evicts keys (StoreMisconfiguredError); one away now
        # is answered 503 store_unavailable until it is back, and is not checked.
        try:
            await run_in_threadpool(check_store_policy, conn)
        except REDIS_OUTAGE as exc:
            log.warning("the job store's maxmemory-policy could not be checked: it is away (%s)", type(exc).__name__)
        yield
        conn.close()

    app = FastAPI(
        title="aex",
        version=__version__,
        description="Robust-network inference, Grad-CAM and adversarial explanations as queued jobs. "
        'Errors are JSON: {"error": {"code": ..., "message": ...}}.',
        lifespan=lifespan,
        docs_url=None,  # service.docs serves /docs without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.green = green
    app.state.auth = Authenticator.from_settings(settings, conn)
    catalogue = Catalogue(settings)
    app.state.audit = AuditLog.from_settings(conn, settings, catalogue)  # records served model names only
    app.state.jobs = JobService(conn, settings, catalogue, cipher, policy)
    app.state.metrics = Metrics(conn)
    install_error_handlers(app)  # adds the innermost middleware
    app.include_router(job_routes.router)
    app.include_router(model_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(ops_routes.router)
    install_viewer(app)  # the HTML viewer at / and its files at /static/
    install_docs(app)
    # Outermost last: the trusted hosts, then CORS (preflights answered before any token is
    # asked for), metrics, the stage timings, and the audit trail, which sees the final status
    # of each request.
    app.add_middleware(AuditMiddleware, audit=app.state.audit)
    app.add_middleware(ServerTimingMiddleware)  # around the audit trail: its final write is a stage
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Location"],
            allow_credentials=False,  # tokens travel in the Authorization header, never in cookies
            max_age=600,
        )
    if settings.trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts)
    return app
