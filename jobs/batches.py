"""Which queued jobs may share one computation: a job's batch signature, from its function, arguments and meta.

The signature is written with the job (``jobs.rqueue.enqueue``: the job hash's ``BATCH_FIELD``,
as text) so that a worker takes a batch's leader and the jobs that share its batch, and claims
them, in one step in Redis (``jobs.rqueue.claiming.claim_next``); the worker checks it again
from the job's own data (``worker.batching``) before it computes them together. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jobs.queues import JOB_FUNCTIONS, JobKind

# The job hash's field holding the signature as text (absent: the job runs alone).
BATCH_FIELD = "aex_batch"


def batch_signature_of(function: str, kwargs: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple | None:
    """What must be equal for two jobs to share a batch, or None for a job that always runs
    alone: an input by reference (fetched from its PACS, with its own retries) and any job
    that is not one of aex's. A classify job batches with classify jobs of the same model and
    the same stability settings (their stability searches then run as rows of one search); an
    explain job with explain jobs of the same model, search settings, Grad-CAM layer and
    stability settings (their explanation rows, whatever their targets, run as one search)."""
    if meta.get("pacs_reference"):
        return None
    if function == JOB_FUNCTIONS[JobKind.CLASSIFY]:
        stability = bool(kwargs.get("stability"))
        return (
            function,
            kwargs.get("model"),
            stability,
            int(kwargs.get("stability_steps") or 0) if stability else 0,
            kwargs.get("stability_mode") if stability else None,
        )
    if function == JOB_FUNCTIONS[JobKind.EXPLAIN]:
        return (
            function,
            kwargs.get("model"),
            kwargs.get("rho"),
            kwargs.get("steps"),
            kwargs.get("layer"),
            kwargs.get("stability_steps"),
            kwargs.get("stability_mode"),
        )
    return None


def signature_text(signature: tuple | None) -> str | None:
    """A signature as the text stored in ``BATCH_FIELD`` (equal signatures, equal texts)."""
    return None if signature is None else json.dumps(list(signature), separators=(",", ":"))
