"""Operations: liveness and readiness (open, saying nothing beyond their status) and Prometheus
metrics (the ``metrics`` scope), outside /v1."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobs.queues import QUEUE_NAMES, JobKind, live_worker_keys
from models.errors import ServiceUnavailableError
from service.auth import Scope, requires
from service.deps import JobsDep
from service.schemas import ErrorResponse

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict:
    """The API process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
def readyz(jobs: JobsDep) -> dict:
    """Redis answers and every queue has at least one live worker (how many: ``/metrics``)."""
    jobs.conn.ping()
    idle = [kind.value for kind in JobKind if not live_worker_keys(jobs.conn, QUEUE_NAMES[kind])]
    if idle:
        raise ServiceUnavailableError(f"no live worker for the {', '.join(idle)} queue(s)")
    return {"status": "ready"}


@router.get("/metrics", response_class=Response, dependencies=[requires(Scope.METRICS)])
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
