"""Every Redis key aex writes besides rq's own, built here and nowhere else."""

from __future__ import annotations

PREFIX = "aex"


def upload_key(job_id: str) -> str:
    """The uploaded bytes of a job (a string with the upload TTL)."""
    return f"{PREFIX}:upload:{job_id}"


def images_key(job_id: str) -> str:
    """PNG results of a job: a hash name -> PNG bytes (with the result TTL)."""
    return f"{PREFIX}:images:{job_id}"


def wake_key() -> str:
    """A list that wakes an idle worker: one entry pushed with every job put in a queue (trimmed;
    a worker blocks on it, then looks at every queue in priority order)."""
    return f"{PREFIX}:wake"


def claim_record_key(take_id: str) -> str:
    """What one take of a worker claimed (a list: the queue's number, then the job ids; kept a
    minute), so that the take sent again after its reply was lost claims nothing twice."""
    return f"{PREFIX}:claimed:{take_id}"


def cancel_key(job_id: str) -> str:
    """Set by DELETE /v1/jobs/{id}; a running job checks it between steps."""
    return f"{PREFIX}:cancel:{job_id}"


def dicom_key(job_id: str) -> str:
    """DICOM results of a job: a hash name -> Part 10 bytes (with the result TTL)."""
    return f"{PREFIX}:dicom:{job_id}"


def reused_job_key(job_id: str) -> str:
    """A job answered from an earlier result (``service.reuse``): a hash of what its view
    needs (kind, model, meta with its owner and ``result_job``, time, the result JSON), aex's
    own record and no rq job, with the remaining TTL of the result it copies."""
    return f"{PREFIX}:reused:{job_id}"


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


def store_epoch_key() -> str:
    """The job store's epoch (``jobs.epoch``): a random id, set once, without a TTL."""
    return f"{PREFIX}:store:epoch"


def api_key_key(name: str) -> str:
    """One API key by name: a hash (digest of its token, scopes, created_at); never the token."""
    return f"{PREFIX}:apikey:{name}"


def api_key_digest_key(digest: str) -> str:
    """The name of the API key whose token has SHA-256 ``digest`` (the lookup at each request)."""
    return f"{PREFIX}:apikey-digest:{digest}"


def api_key_names_key() -> str:
    """The set of API key names (GET /v1/keys lists it without a SCAN)."""
    return f"{PREFIX}:apikeys"


def api_keys_revision_key() -> str:
    """A counter of the API keys' changes (each creation and revocation adds one, in the same
    transaction): the API's key cache is good only while it is unchanged."""
    return f"{PREFIX}:apikeys:revision"


def audit_key() -> str:
    """The audit trail: a stream of access records, trimmed to AEX_AUDIT_RETENTION_SECONDS."""
    return f"{PREFIX}:audit"


def principal_jobs_key(owner_digest: str) -> str:
    """The ids of a principal's jobs that may still be queued or running (a sorted set by
    reservation time; named by a digest of the principal, so no identity is in a key name)."""
    return f"{PREFIX}:principal-jobs:{owner_digest}"


def scoped_result_index_key(scope: str, cache_key: str) -> str:
    """The id of the job whose finished result answers ``cache_key`` within one reuse scope
    (``service.auth.reuse_scope``: a principal or its tenant, as a digest), with the result
    TTL: a result is reused only for whoever may see it."""
    return f"{PREFIX}:result:{scope}:{cache_key}"


def watch_key(pacs: str, model: str, part: str) -> str:
    """State of ``aex watch --pacs pacs --model model``: ``part`` "cursor" (where it is in the
    PACS's change feed or poll, a string), "instance:<SOP Instance UID>" (that instance was
    submitted: "job:<id>", "failed:<code>", or "pending:<run>" while it is), "lock" (the run
    following it) or "jobs" (a hash job id -> the instance, for the jobs whose results the
    watcher stores back itself). Names, never addresses: a PACS is named as AEX_PACS names it."""
    return f"{PREFIX}:watch:{pacs}:{model}:{part}"
