"""The HTTP status of every error code, in one table, and the JSON error body.

The codes themselves live in ``models.errors`` (transport-agnostic: a code and a message);
this is the only place that knows which status each one leaves the API with. A code that is
missing here is a bug (a test checks the table covers the catalogue); it would leave as 500.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from models import errors as e

HTTP_STATUS: dict[str, int] = {
    e.AexError.code: 500,
    e.TransientError.code: 503,
    e.CheckpointError.code: 422,
    e.UnsafeCheckpointError.code: 422,
    e.UnknownArchitectureError.code: 400,
    e.BoundNotReachedError.code: 422,
    e.DataError.code: 400,
    e.BadParameterError.code: 400,
    e.UnknownModelError.code: 404,
    e.UnknownJobError.code: 404,
    e.JobLostError.code: 410,
    e.RequestTimeoutError.code: 408,
    e.UploadTooLargeError.code: 413,
    e.UnsupportedMediaError.code: 415,
    e.UndecodableImageError.code: 422,
    e.DecompressionBombError.code: 422,
    e.ExtremeAspectRatioError.code: 422,
    e.NonFinitePixelsError.code: 422,
    e.InvalidDicomError.code: 422,
    e.QueueFullError.code: 429,
    e.ServiceUnavailableError.code: 503,
    e.JobCancelledError.code: 409,
    e.TrainingDivergedError.code: 500,
    e.WorkerLostError.code: 500,
    e.JobTimeoutError.code: 504,
    e.JobFailedError.code: 500,
    e.JobRefusedError.code: 500,
    e.UnauthenticatedError.code: 401,
    e.ForbiddenError.code: 403,
    e.KeyExistsError.code: 409,
    e.UnknownKeyError.code: 404,
    e.TooManyJobsError.code: 429,
    e.DecryptionError.code: 500,
    e.UnknownPacsError.code: 400,
    e.InstanceNotFoundError.code: 404,
    e.PacsError.code: 502,
    e.PacsUnreachableError.code: 502,
}


def status_of(code: str) -> int:
    """The HTTP status an error with ``code`` is answered with (500 for an unknown code)."""
    return HTTP_STATUS.get(code, 500)


def error_response(status: int, code: str, message: str, **extra) -> JSONResponse:
    """``{"error": {"code", "message"}}`` (and ``extra`` keys beside it) with ``status``. A
    408 also closes the connection: the rest of a stalled body is never waited for."""
    headers = {"Connection": "close"} if status == 408 else None
    return JSONResponse({"error": {"code": code, "message": message}, **extra}, status_code=status, headers=headers)
