"""Operations: liveness, readiness and Prometheus metrics (outside /v1)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.errors import ServiceUnavailableError
from service.deps import JobsDep
from service.schemas import ErrorResponse
from worker.queues import QUEUE_NAMES, JobKind, live_worker_keys

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict:
    """The API process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
def readyz(jobs: JobsDep) -> dict:
    """Redis answers and every queue has at least one live worker."""
    jobs.conn.ping()
    workers = {kind.value: len(live_worker_keys(jobs.conn, QUEUE_NAMES[kind])) for kind in JobKind}
    idle = [kind for kind, n in workers.items() if n == 0]
    if idle:
        raise ServiceUnavailableError(f"no live worker for the {', '.join(idle)} queue(s)")
    return {"status": "ready", "workers": workers}


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
