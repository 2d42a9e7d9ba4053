"""The HTTP status of every error code, in one table, and the JSON error body.

The codes themselves live in ``models.errors`` (transport-agnostic: a code and a message);
this is the only place that knows which status each one leaves the API with. A code that is
missing here is a bug (a test checks the table covers the catalogue); it would leave as 500.
A code that is worth trying again later also has its ``Retry-After`` here (``RETRY_AFTER``),
which every answer with that code carries.

The job store refusing a request is ``store_unavailable`` (503), whatever the route:
``store_refusal(exc)`` says which Redis errors mean that: the classes the API and the workers
share (``jobs.queues.STORE_UNAVAILABLE``: unreachable, out of memory, a read-only replica, an
ACL refusal, loading, a master down ...), a cluster down, and the refusals Redis names only by
the code that opens its message (raised inside a script, or without a redis-py class: a failing
disk, too few replicas, a busy script). Any other Redis error, a plain ``ResponseError`` for
one, is a bug of ours and stays a 500.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from redis import exceptions as rx

from jobs.queues import STORE_UNAVAILABLE
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
    e.ModelInputError.code: 422,
    e.InvalidDicomError.code: 422,
    e.QueueFullError.code: 429,
    e.ServiceUnavailableError.code: 503,
    e.StoreUnavailableError.code: 503,
    e.StoreMisconfiguredError.code: 503,
    e.JobCancelledError.code: 409,
    e.TrainingDivergedError.code: 500,
    e.NonFiniteResultError.code: 422,
    e.WorkerLostError.code: 500,
    e.JobTimeoutError.code: 504,
    e.JobFailedError.code: 500,
    e.JobRefusedError.code: 500,
    e.UnauthenticatedError.code: 401,
    e.KeyLostError.code: 401,
    e.ForbiddenError.code: 403,
    e.KeyExistsError.code: 409,
    e.UnknownKeyError.code: 404,
    e.TooManyJobsError.code: 429,
    e.TooManyConnectionsError.code: 429,
    e.DecryptionError.code: 500,
    e.UnknownPacsError.code: 400,
    e.InstanceNotFoundError.code: 404,
    e.PacsError.code: 502,
    e.PacsUnreachableError.code: 502,
}


# Seconds a client should wait before trying again, by code (the ``Retry-After`` header).
RETRY_AFTER: dict[str, int] = {
    e.TransientError.code: 5,
    e.QueueFullError.code: 5,
    e.TooManyConnectionsError.code: 5,
    e.ServiceUnavailableError.code: 5,
    e.StoreUnavailableError.code: 5,
}

# The Redis errors that mean the store refuses or cannot be reached.
STORE_REFUSALS: tuple[type[Exception], ...] = (*STORE_UNAVAILABLE, rx.ClusterDownError)
# What the answer's message says of each (the first class that matches; a subclass first).
DESCRIPTIONS: tuple[tuple[type[Exception], str], ...] = (
    (rx.BusyLoadingError, "is loading its data"),
    (rx.AuthenticationError, "refuses this client's credentials"),
    (rx.ConnectionError, "is unreachable"),
    (rx.TimeoutError, "did not answer in time"),
    (rx.OutOfMemoryError, "is out of memory (maxmemory) and refuses writes"),
    (rx.ReadOnlyError, "is a read-only replica and refuses writes"),
    (rx.NoPermissionError, "refuses this command to the API's user (ACL)"),
    (rx.MasterDownError, "is a replica whose master is down"),
    (rx.ClusterDownError, "is a cluster that is down"),
    (rx.TryAgainError, "asks to try again (a cluster resharding)"),
    (rx.ExecAbortError, "aborted a transaction whose commands it refused"),
)
# The same refusals as the error code Redis puts first (an error raised inside a script, or one
# redis-py has no class for keeps it in its message).
REFUSAL_CODES: dict[str, str] = {
    "OOM": "is out of memory (maxmemory) and refuses writes",
    "READONLY": "is a read-only replica and refuses writes",
    "NOPERM": "refuses this command to the API's user (ACL)",
    "LOADING": "is loading its data",
    "MASTERDOWN": "is a replica whose master is down",
    "CLUSTERDOWN": "is a cluster that is down",
    "TRYAGAIN": "asks to try again (a cluster resharding)",
    "MISCONF": "cannot persist to its disk and refuses writes",
    "NOREPLICAS": "has too few replicas to accept writes",
    "BUSY": "is busy running a script",
    "NOAUTH": "refuses this client's credentials",
    "WRONGPASS": "refuses this client's credentials",
}
# What Redis says, without a code of its own, when an ACL refuses a command a script runs.
ACL_PHRASES = ("can't run this command", "no permissions to")


def store_refusal(exc: BaseException) -> str | None:
    """What the job store's refusal is (``is out of memory ...``) when ``exc`` is a Redis
    error that means the store refuses or is unreachable; None for any other exception,
    a Redis error that is a bug of ours (a wrong type, a syntax error) included."""
    if not isinstance(exc, rx.RedisError):
        return None
    if isinstance(exc, STORE_REFUSALS):
        return next((what for cls, what in DESCRIPTIONS if isinstance(exc, cls)), "refuses the request")
    if isinstance(exc, rx.ResponseError):
        words = str(exc).split(None, 1)
        first = words[0] if words else ""
        if first in REFUSAL_CODES:
            return REFUSAL_CODES[first]
        if any(phrase in str(exc) for phrase in ACL_PHRASES):
            return REFUSAL_CODES["NOPERM"]
    return None


def store_unavailable(what: str) -> e.StoreUnavailableError:
    """The catalogue's error for a store that ``what`` (never the Redis error's own text)."""
    return e.StoreUnavailableError(f"the job store (Redis) {what}; try again later")


def status_of(code: str) -> int:
    """The HTTP status an error with ``code`` is answered with (500 for an unknown code)."""
    return HTTP_STATUS.get(code, 500)


def error_response(status: int, code: str, message: str, **extra) -> JSONResponse:
    """``{"error": {"code", "message"}}`` (and ``extra`` keys beside it) with ``status``. A
    408 also closes the connection: the rest of a stalled body is never waited for; a code of
    ``RETRY_AFTER`` carries its ``Retry-After``."""
    headers = {"Connection": "close"} if status == 408 else {}
    if code in RETRY_AFTER:
        headers["Retry-After"] = str(RETRY_AFTER[code])
    return JSONResponse({"error": {"code": code, "message": message}, **extra}, status_code=status, headers=headers)
