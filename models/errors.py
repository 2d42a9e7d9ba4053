"""The catalogue of error codes: every named error of the project, in one flat module.

Each error carries a stable machine-readable ``code`` and a message, and nothing about any
transport: the HTTP status of each code is mapped in one table in ``service/errors.py``, the
command line prints ``error [code]: message``. ``TransientError`` marks the only failures
worth retrying (a Redis hiccup, a callback host that timed out). Torch-free.
"""

from __future__ import annotations


class AexError(Exception):
    """Base of every error this project raises on purpose."""

    code = "aex_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TransientError(AexError):
    """A failure that may succeed on retry (network, Redis)."""

    code = "transient"


class CheckpointError(AexError):
    """A checkpoint file is missing, truncated, unsafe or lacks metadata."""

    code = "bad_checkpoint"


class UnsafeCheckpointError(CheckpointError):
    """A file would need code execution (a pickle global we do not allow) to load."""

    code = "unsafe_checkpoint"


class UnknownArchitectureError(AexError):
    code = "unknown_architecture"


class BoundNotReachedError(AexError):
    """The perturbation search did not settle in its first half: raise eps or steps."""

    code = "bound_not_reached"


class DataError(AexError):
    """A data set path or file cannot be read as one of the supported layouts."""

    code = "bad_data"


class BadParameterError(AexError):
    code = "bad_parameter"


class UnknownModelError(AexError):
    code = "unknown_model"


class UnknownJobError(AexError):
    code = "unknown_job"


class JobLostError(UnknownJobError):
    """The job store (Redis) lost its data (restarted without persistence) after the job was accepted."""

    code = "job_lost"


class UploadTooLargeError(AexError):
    code = "upload_too_large"


class RequestTimeoutError(AexError):
    """The client did not send its whole request body within AEX_BODY_TIMEOUT_SECONDS."""

    code = "request_timeout"


class UnsupportedMediaError(AexError):
    code = "unsupported_media_type"


class UndecodableImageError(AexError):
    code = "undecodable_image"


class DecompressionBombError(UndecodableImageError):
    code = "decompression_bomb"


class ExtremeAspectRatioError(AexError):
    """An image whose longer side is too many times its shorter side (AEX_MAX_ASPECT_RATIO)."""

    code = "extreme_aspect_ratio"


class NonFinitePixelsError(AexError):
    """Pixel values that are NaN or infinite (a float image, or a DICOM rescale): no result
    is built from them."""

    code = "non_finite_pixels"


class ModelInputError(AexError):
    """The image as the network would see it (decoded, scaled to [0, 1], resized) holds values
    that are not finite or outside [0, 1]: nothing is computed from it."""

    code = "invalid_model_input"


class NonFiniteResultError(AexError):
    """A number the computation produced (a logit, probability, score, radius, map or picture)
    is NaN or infinite: the job fails with this instead of finishing with it."""

    code = "non_finite_result"


class InvalidDicomError(AexError):
    """A DICOM file whose image attributes cannot be used (missing, not numbers, inconsistent
    with the pixel data); the message names the attribute, never its value."""

    code = "invalid_dicom"


class QueueFullError(AexError):
    code = "queue_full"


class ServiceUnavailableError(AexError):
    code = "service_unavailable"


class StoreUnavailableError(ServiceUnavailableError):
    """The job store (Redis) refuses the request: unreachable, out of memory, a read-only
    replica, a user its ACL does not allow, still loading. Nothing was done that needed it."""

    code = "store_unavailable"


class StoreMisconfiguredError(AexError):
    """The job store (Redis) is set up so that it would lose the service's data: a
    ``maxmemory-policy`` that evicts keys, or one that cannot be read. Raised at start-up."""

    code = "store_misconfigured"


class JobCancelledError(AexError):
    code = "job_cancelled"


class TrainingDivergedError(AexError):
    """The training loss became NaN or infinite."""

    code = "training_diverged"


class WorkerLostError(AexError):
    """The worker running a job stopped renewing its lease (killed, out of memory, machine lost)."""

    code = "worker_lost"


class JobTimeoutError(AexError):
    """A job ran past its time limit and was stopped."""

    code = "job_timeout"


class JobFailedError(AexError):
    """A job raised an error that is not one of ours (a bug or an environment problem)."""

    code = "job_failed"


class UnauthenticatedError(AexError):
    """A request without a valid bearer token (none, unknown, revoked, expired, badly signed)."""

    code = "unauthenticated"


class KeyLostError(UnauthenticatedError):
    """An API key token made before the job store (Redis) lost its data (restarted without
    persistence, or emptied): its key is gone with the data; an admin must make a new one."""

    code = "key_lost"


class ForbiddenError(AexError):
    """A valid token whose scopes do not include the one the request needs."""

    code = "forbidden"


class KeyExistsError(AexError):
    """An API key of that name exists already (revoke it first)."""

    code = "key_exists"


class UnknownKeyError(AexError):
    """No API key has that name."""

    code = "unknown_key"


class TooManyJobsError(AexError):
    """The principal has AEX_MAX_JOBS_PER_PRINCIPAL jobs queued or running already."""

    code = "too_many_jobs"


class TooManyConnectionsError(AexError):
    """The client (an IPv4 address, an IPv6 /64) holds AEX_MAX_CONNECTIONS_PER_CLIENT
    connections already; the API answers a new one with this code and closes it."""

    code = "too_many_connections"


class DecryptionError(AexError):
    """Data stored encrypted in Redis could not be decrypted (another AEX_DATA_KEY, or altered)."""

    code = "decryption_failed"


class UnknownPacsError(AexError):
    """A request named a PACS that AEX_PACS does not configure (requests name PACS, never URLs)."""

    code = "unknown_pacs"


class InstanceNotFoundError(AexError):
    """The PACS has no instance with the Study, Series and SOP Instance UIDs given (named in
    the message: UIDs are not patient data)."""

    code = "instance_not_found"


class PacsError(AexError):
    """A PACS answered, but not as DICOMweb or DIMSE should (refused credentials, a malformed
    answer, a store it rejected); the message names the PACS, never its address."""

    code = "pacs_error"


class PacsUnreachableError(PacsError):
    """A PACS could not be reached (connection refused, timed out, 5xx) after bounded retries."""

    code = "pacs_unreachable"


def error_class_for(code: str) -> type[AexError]:
    """The exception class that carries ``code`` (``JobFailedError`` when none does)."""
    stack: list[type[AexError]] = [AexError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return JobFailedError


class JobRefusedError(AexError):
    """A worker refused a job that is not one of aex's (it names another function or rq
    callbacks): forged by someone who could write to Redis. Nothing it names was run."""

    code = "job_refused"
