"""The HTTP routes: parse, call the job service, answer. Blocking work runs in the thread
pool (plain ``def`` routes, or ``run_in_threadpool`` after an async body read)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from models.errors import ServiceUnavailableError
from service.deps import JobsDep, SettingsDep
from service.errors import status_of
from service.schemas import ClassifyParams, ErrorResponse, ExplainParams, JobView, multipart_openapi, parse_params
from service.uploads import read_upload
from worker.queues import QUEUE_NAMES, JobKind, live_worker_keys
from worker.states import ApiStatus

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 429, 503)}

v1 = APIRouter(prefix="/v1")
ops = APIRouter()


def _job_response(view: JobView, status_code: int) -> JSONResponse:
    headers = {"Location": view.url} if status_code == 202 else None
    return JSONResponse(view.model_dump(mode="json"), status_code=status_code, headers=headers)


@v1.post(
    "/classify",
    response_model=JobView,
    openapi_extra=multipart_openapi(ClassifyParams),
    responses={202: {"model": JobView, "description": "still running: poll the Location"}, **ERRORS},
)
async def classify(request: Request, settings: SettingsDep, jobs: JobsDep) -> Response:
    """Classify an image or a DICOM file (optionally with its stability score). Answers 200
    with the result when the job ends within AEX_CLASSIFY_WAIT_SECONDS (at once when an
    identical request's result is still kept), else 202 with ``Location: /v1/jobs/{id}``."""
    upload = await read_upload(request, settings)
    params = parse_params(ClassifyParams, upload.fields)
    view = await run_in_threadpool(jobs.classify, upload, params)
    if view.status is ApiStatus.FINISHED:
        return _job_response(view, 200)
    if view.status in (ApiStatus.FAILED, ApiStatus.CANCELLED) and view.error is not None:
        status = status_of(view.error.code)
        return JSONResponse({"error": view.error.model_dump(), "job": view.model_dump(mode="json")}, status_code=status)
    return _job_response(view, 202)


@v1.post(
    "/explain",
    status_code=202,
    response_model=JobView,
    openapi_extra=multipart_openapi(ExplainParams),
    responses={
        200: {"model": JobView, "description": "answered from an identical request's result (result.reused = true)"},
        **ERRORS,
    },
)
async def explain(request: Request, settings: SettingsDep, jobs: JobsDep) -> Response:
    """Queue adversarial explanations, Grad-CAM and the stability score for an image or a
    DICOM file; answers 202 with ``Location: /v1/jobs/{id}``, or 200 with the finished job
    when an identical request's result is still kept."""
    upload = await read_upload(request, settings)
    params = parse_params(ExplainParams, upload.fields)
    view = await run_in_threadpool(jobs.explain, upload, params)
    return _job_response(view, 200 if view.status is ApiStatus.FINISHED else 202)


@v1.get("/jobs/{job_id}", response_model=JobView, responses=ERRORS)
def get_job(job_id: str, jobs: JobsDep) -> JobView:
    """Status, queue position, progress, timings and, when finished, the result."""
    return jobs.view(job_id)


@v1.delete("/jobs/{job_id}", response_model=JobView, responses={202: {"model": JobView}, **ERRORS})
def cancel_job(job_id: str, jobs: JobsDep) -> Response:
    """Cancel a job: at once when queued (200), at the next search step when running (202)."""
    view = jobs.cancel(job_id)
    return _job_response(view, 202 if view.status is ApiStatus.RUNNING else 200)


@v1.get(
    "/jobs/{job_id}/images/{name}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "a PNG"}, **ERRORS},
)
def get_image(job_id: str, name: str, jobs: JobsDep) -> Response:
    """One PNG of a finished explain job (names are in the job's ``images``)."""
    return Response(jobs.image(job_id, name), media_type="image/png")


@v1.get(
    "/jobs/{job_id}/dicom/{name}",
    response_class=Response,
    responses={
        200: {"content": {"application/dicom": {}}, "description": "a DICOM Part 10 file (Secondary Capture)"},
        **ERRORS,
    },
)
def get_dicom(job_id: str, name: str, jobs: JobsDep) -> Response:
    """One DICOM Secondary Capture object of a finished explain job on DICOM input (names
    are in the job's ``dicom``): in the source's study, a new series, referencing the source."""
    return Response(
        jobs.dicom(job_id, name),
        media_type="application/dicom",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@v1.get("/models")
def list_models(settings: SettingsDep, jobs: JobsDep) -> dict:
    """The served checkpoints with their metadata and metrics."""
    models = jobs.catalogue.models(jobs.conn)
    default = settings.default_model or (sorted(models)[0] if models else None)
    return {
        "default": default,
        "models": [{k: v for k, v in models[name].items() if k != "layers"} for name in sorted(models)],
    }


@v1.get("/models/{name}", responses=ERRORS)
def get_model(name: str, jobs: JobsDep) -> dict:
    """One served checkpoint, with the layer names accepted for Grad-CAM."""
    return jobs.catalogue.resolve(jobs.conn, name)


@ops.get("/healthz")
def healthz() -> dict:
    """The API process is alive."""
    return {"status": "ok"}


@ops.get("/readyz", responses={503: {"model": ErrorResponse}})
def readyz(jobs: JobsDep) -> dict:
    """Redis answers and every queue has at least one live worker."""
    jobs.conn.ping()
    workers = {kind.value: len(live_worker_keys(jobs.conn, QUEUE_NAMES[kind])) for kind in JobKind}
    idle = [kind for kind, n in workers.items() if n == 0]
    if idle:
        raise ServiceUnavailableError(f"no live worker for the {', '.join(idle)} queue(s)")
    return {"status": "ready", "workers": workers}


@ops.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
