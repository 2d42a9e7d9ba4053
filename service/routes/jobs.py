"""Jobs: submit a classification or an explanation, view a job, cancel it, download its PNGs
and DICOM objects; each for the principal that asks (``submit`` to submit, ``read`` for the
rest), and each noted in the audit trail with the job, the model and the input's sha256."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from jobs.states import TERMINAL, ApiStatus
from service.audit import note
from service.audit_answer import answer_ahead, record_answer
from service.auth import Principal, Scope, acting, confirm_before_answering, requires
from service.deps import JobsDep, SettingsDep
from service.errors import status_of
from service.green import off_loop
from service.jobs import JobService
from service.multipart import Upload, read_upload
from service.schemas import ERRORS, ClassifyParams, ExplainParams, JobView, multipart_openapi, parse_params
from service.timing import stage
from service.views import ShownJob

router = APIRouter(prefix="/v1", tags=["jobs"])

# A submission confirms a cached key with its first reads and writes its pending audit record
# with its job (service.auth.guard.Acting): two round trips fewer.
Submitter = Annotated[Principal, requires(Scope.SUBMIT, with_first_write=True)]
Reader = Annotated[Principal, requires(Scope.READ)]


def _json(content: dict, status_code: int, view: ShownJob, headers: dict[str, str] | None = None) -> JSONResponse:
    try:
        return JSONResponse(content, status_code=status_code, headers=headers)
    except ValueError:  # a NaN or an infinity in a stored result (a worker never stores one)
        view.typed()  # NonFiniteResultError naming where, as the result's model refuses it
        raise


def _job_response(view: ShownJob, status_code: int) -> JSONResponse:
    """The view as the answer (``Location`` on a 202), its result as stored (``ShownJob``)."""
    headers = {"Location": view.url} if status_code == 202 else None
    return _json(view.content(), status_code, view, headers)


def _classify_response(view: ShownJob) -> JSONResponse:
    """A classify's answer: 200 with the result, the job's own error when it failed or was
    cancelled, else 202 (still running: poll the Location)."""
    if view.status is ApiStatus.FINISHED:
        return _job_response(view, 200)
    if view.status in (ApiStatus.FAILED, ApiStatus.CANCELLED) and view.error is not None:
        body = {"error": view.error.model_dump(), "job": view.content()}
        return _json(body, status_of(view.error.code), view)
    return _job_response(view, 202)


def _answer(request: Request, view: ShownJob, respond: Callable[[ShownJob], Response]) -> Response:
    """The answer ``respond`` makes of ``view``, its final audit record written (``record_answer``:
    in this thread of the pool, no trip of its own). Blocking."""
    note(request, job_id=view.id, model=view.model)
    with stage("respond"):
        response = respond(view)
    return record_answer(request, response)


def _shown(status_code: int) -> Callable[[ShownJob], Response]:
    return lambda view: _job_response(view, status_code)


def _classify(request: Request, jobs: JobService, principal: Principal, upload: Upload, params) -> Response:
    # Its 200's audit record written with the wait when the job finished (answer_ahead).
    view = jobs.classify(principal, upload, params, acting(request), answer_ahead(request))
    return _answer(request, view, _classify_response)


def _explain(request: Request, jobs: JobService, principal: Principal, upload: Upload, params) -> Response:
    view = jobs.explain(principal, upload, params, acting(request))
    return _answer(request, view, _shown(200 if view.status is ApiStatus.FINISHED else 202))


async def _submission(request: Request, principal, settings, jobs, params_model, work) -> Response:
    """A submission's upload read and its parameters parsed (noted for the audit record), then
    ``work`` (the job, its answer and the answer's audit record), blocking job-store work, in a
    greenlet of the event loop (``service.green.off_loop``: the thread pool for a large upload
    or a TLS connection to the store); a submission refused on the way still confirms its key
    first."""
    try:
        with stage("parse"):
            upload = await read_upload(request, settings)
            params = parse_params(params_model, upload.fields)
            note(request, model=params.model, input_sha256=upload.sha256)
        return await off_loop(request.app.state.green, len(upload.data), work, request, jobs, principal, upload, params)
    except Exception:
        await confirm_before_answering(request)
        raise


@router.post(
    "/classify",
    response_model=JobView,
    openapi_extra=multipart_openapi(ClassifyParams),
    responses={202: {"model": JobView, "description": "still running: poll the Location"}, **ERRORS},
)
async def classify(request: Request, principal: Submitter, settings: SettingsDep, jobs: JobsDep) -> Response:
    """Classify an image or a DICOM file (optionally with its stability score). Answers 200
    with the result when the job ends within AEX_CLASSIFY_WAIT_SECONDS (at once when an
    identical request's result is still kept), else 202 with ``Location: /v1/jobs/{id}``."""
    return await _submission(request, principal, settings, jobs, ClassifyParams, _classify)


@router.post(
    "/explain",
    status_code=202,
    response_model=JobView,
    openapi_extra=multipart_openapi(ExplainParams),
    responses={
        200: {"model": JobView, "description": "answered from an identical request's result (result.reused = true)"},
        **ERRORS,
    },
)
async def explain(request: Request, principal: Submitter, settings: SettingsDep, jobs: JobsDep) -> Response:
    """Queue adversarial explanations, Grad-CAM and the stability score for an image or a
    DICOM file; answers 202 with ``Location: /v1/jobs/{id}``, or 200 with the finished job
    when an identical request's result is still kept."""
    return await _submission(request, principal, settings, jobs, ExplainParams, _explain)


@router.get("/jobs/{job_id}", response_model=JobView, responses=ERRORS)
def get_job(request: Request, job_id: str, principal: Reader, jobs: JobsDep) -> Response:
    """Status, queue position, progress, timings and, when finished, the result."""
    return _answer(request, jobs.view(principal, job_id), _shown(200))


@router.delete("/jobs/{job_id}", response_model=JobView, responses={202: {"model": JobView}, **ERRORS})
def cancel_job(request: Request, job_id: str, principal: Reader, jobs: JobsDep) -> Response:
    """Cancel a job: at once when queued (200, ``cancelled``), at its next search step when
    running or being taken by a worker (202); a job already over is shown as it is (200)."""
    view = jobs.cancel(principal, job_id)
    return _answer(request, view, _shown(200 if view.status in TERMINAL else 202))


@router.get(
    "/jobs/{job_id}/images/{name}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "a PNG"}, **ERRORS},
)
def get_image(job_id: str, name: str, principal: Reader, jobs: JobsDep) -> Response:
    """One PNG of a finished explain job (names are in the job's ``images``)."""
    return Response(jobs.image(principal, job_id, name), media_type="image/png")


@router.get(
    "/jobs/{job_id}/dicom/{name}",
    response_class=Response,
    responses={
        200: {"content": {"application/dicom": {}}, "description": "a DICOM Part 10 file (Secondary Capture)"},
        **ERRORS,
    },
)
def get_dicom(job_id: str, name: str, principal: Reader, jobs: JobsDep) -> Response:
    """One DICOM Secondary Capture object of a finished explain job on DICOM input (names
    are in the job's ``dicom``): in the source's study, a new series, referencing the source."""
    return Response(
        jobs.dicom(principal, job_id, name),
        media_type="application/dicom",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
