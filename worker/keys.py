"""Every Redis key aex writes besides rq's own, built here and nowhere else."""

from __future__ import annotations

PREFIX = "aex"


def upload_key(job_id: str) -> str:
    """The uploaded bytes of a job (a string with the upload TTL)."""
    return f"{PREFIX}:upload:{job_id}"


def images_key(job_id: str) -> str:
    """PNG results of a job: a hash name -> PNG bytes (with the result TTL)."""
    return f"{PREFIX}:images:{job_id}"


def cancel_key(job_id: str) -> str:
    """Set by DELETE /v1/jobs/{id}; a running job checks it between steps."""
    return f"{PREFIX}:cancel:{job_id}"


def dicom_key(job_id: str) -> str:
    """DICOM results of a job: a hash name -> Part 10 bytes (with the result TTL)."""
    return f"{PREFIX}:dicom:{job_id}"


def result_index_key(cache_key: str) -> str:
    """The id of the job whose finished result answers ``cache_key`` (result TTL)."""
    return f"{PREFIX}:result:{cache_key}"


def callback_key(job_id: str) -> str:
    """The delivery record of a job's callback (JSON, with the result TTL)."""
    return f"{PREFIX}:callback:{job_id}"


# Field of rq's worker hash where each worker publishes the checkpoints it serves: the
# catalogue lives exactly as long as the worker's registration does.
CATALOGUE_FIELD = "aex_models"


def duration_key(kind: str) -> str:
    return f"{PREFIX}:metrics:duration:{kind}"


def outcomes_key() -> str:
    return f"{PREFIX}:metrics:outcomes"
