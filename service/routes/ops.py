"""Operations: liveness and readiness (open, saying nothing beyond their status) and Prometheus
metrics (the ``metrics`` scope), outside /v1.

``/healthz`` never touches Redis (the process is alive even when the store is not);
``/readyz`` writes a probe key and probes the audit trail (which every audited request writes),
so a store that answers but refuses writes (out of memory, a read-only replica, an ACL
refusal) makes the API not ready: 503 ``store_unavailable``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobs.keys import PREFIX
from jobs.queues import QUEUE_NAMES, JobKind
from jobs.rqueue.layout import live_worker_keys
from models.errors import ServiceUnavailableError
from service.auth import Scope, requires
from service.deps import JobsDep
from service.schemas import ErrorResponse

router = APIRouter(tags=["ops"])

READY_PROBE_KEY = f"{PREFIX}:ready-probe"  # written by /readyz: can the API write to the store?
READY_PROBE_MS = 10_000


@router.get("/healthz")
def healthz() -> dict:
    """The API process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
def readyz(request: Request, jobs: JobsDep) -> dict:
    """Redis takes writes, the audit trail's included, and every queue has at least one live
    worker (how many: ``/metrics``)."""
    jobs.conn.set(READY_PROBE_KEY, b"1", px=READY_PROBE_MS)  # a refusal: 503 store_unavailable
    request.app.state.audit.probe()
    idle = [kind.value for kind in JobKind if not live_worker_keys(jobs.conn, QUEUE_NAMES[kind])]
    if idle:
        raise ServiceUnavailableError(f"no live worker for the {', '.join(idle)} queue(s)")
    return {"status": "ready"}


@router.get("/metrics", response_class=Response, dependencies=[requires(Scope.METRICS)])
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
