"""Every named error of the project, in one flat module.

Each carries a stable machine-readable ``code`` and an HTTP status so the service can map
any of them to a JSON error body without a lookup table elsewhere. ``TransientError`` marks
the only failures worth retrying (a Redis hiccup, a callback host that timed out).
"""

from __future__ import annotations


class AexError(Exception):
    """Base of every error this project raises on purpose."""

    code = "aex_error"
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TransientError(AexError):
    """A failure that may succeed on retry (network, Redis)."""

    code = "transient"
    http_status = 503


class CheckpointError(AexError):
    """A checkpoint file is missing, truncated, unsafe or lacks metadata."""

    code = "bad_checkpoint"
    http_status = 422


class UnsafeCheckpointError(CheckpointError):
    """A file would need code execution (a pickle global we do not allow) to load."""

    code = "unsafe_checkpoint"


class UnknownArchitectureError(AexError):
    code = "unknown_architecture"
    http_status = 400


class BoundNotReachedError(AexError):
    """The perturbation search did not settle in its first half: raise eps or steps."""

    code = "bound_not_reached"
    http_status = 422


class DataError(AexError):
    """A data set path or file cannot be read as one of the supported layouts."""

    code = "bad_data"
    http_status = 400


class BadParameterError(AexError):
    code = "bad_parameter"
    http_status = 400


class UnknownModelError(AexError):
    code = "unknown_model"
    http_status = 404


class UnknownJobError(AexError):
    code = "unknown_job"
    http_status = 404


class UploadTooLargeError(AexError):
    code = "upload_too_large"
    http_status = 413


class UnsupportedMediaError(AexError):
    code = "unsupported_media_type"
    http_status = 415


class UndecodableImageError(AexError):
    code = "undecodable_image"
    http_status = 422


class DecompressionBombError(UndecodableImageError):
    code = "decompression_bomb"


class QueueFullError(AexError):
    code = "queue_full"
    http_status = 429


class ServiceUnavailableError(AexError):
    code = "service_unavailable"
    http_status = 503


class JobCancelledError(AexError):
    code = "job_cancelled"
    http_status = 409


class TrainingDivergedError(AexError):
    """The training loss became NaN or infinite."""

    code = "training_diverged"
    http_status = 500


class WorkerLostError(AexError):
    """The worker running a job stopped renewing its lease (killed, out of memory, machine lost)."""

    code = "worker_lost"
    http_status = 500


class JobTimeoutError(AexError):
    """A job ran past its time limit and was stopped."""

    code = "job_timeout"
    http_status = 504


class JobFailedError(AexError):
    """A job raised an error that is not one of ours (a bug or an environment problem)."""

    code = "job_failed"
    http_status = 500


def error_class_for(code: str) -> type[AexError]:
    """The exception class that carries ``code`` (``JobFailedError`` when none does)."""
    stack: list[type[AexError]] = [AexError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return JobFailedError
