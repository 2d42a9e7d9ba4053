"""The job store's epoch: a random id in Redis that changes when Redis loses its data, and that
every job id and API key token carries, so a job or a key forgotten by a Redis restart without
persistence is reported as lost (``job_lost``, ``key_lost``), not as expired or unknown.

The first process that finds no epoch (a new or emptied Redis) sets one (SET NX; no TTL, so
it lives exactly as long as the data does: a Redis with persistence keeps it across restarts,
one without starts a new epoch). A job id is the 8 hex digits of the epoch it was accepted in,
20 random hex digits and 4 check digits (of the 28 before them): 32 hex digits, like a UUID's.
An API key token carries the epoch it was made in the same way (``service.auth.apikeys``).
Only an id with valid check digits and another epoch counts as lost: a mistyped or invented
id stays an unknown one. Torch-free: the API uses it.
"""

from __future__ import annotations

import hashlib
import secrets

from redis import Redis

from jobs.keys import store_epoch_key

EPOCH_DIGITS = 8
CHECK_DIGITS = 4
JOB_ID_DIGITS = 32


def store_epoch(conn: Redis) -> str:
    """The epoch of the data Redis holds now (set here if Redis has none)."""
    with conn.pipeline() as pipe:  # MULTI: set-if-absent and read in one step
        pipe.set(store_epoch_key(), secrets.token_hex(EPOCH_DIGITS // 2), nx=True)
        pipe.get(store_epoch_key())
        _, epoch = pipe.execute()
    return epoch.decode()


def check_digits(body: str) -> str:
    """The 4 hex check digits of ``body`` (a job id's or a token's): they tell an id aex made
    from a mistyped one, nothing more (anyone can compute them)."""
    return hashlib.sha256(body.encode()).hexdigest()[:CHECK_DIGITS]


def checked(text: str) -> bool:
    """Whether ``text`` ends with the check digits of what comes before them."""
    body, check = text[:-CHECK_DIGITS], text[-CHECK_DIGITS:]
    return len(text) > CHECK_DIGITS and check_digits(body) == check


def new_job_id(conn: Redis, epoch: bytes | str | None = None) -> str:
    """A new job id: the store's epoch (``epoch``, as a read of ``store_epoch_key()`` gave it
    with others; read here when None), random hex digits, check digits."""
    if isinstance(epoch, bytes):
        epoch = epoch.decode()
    body = (epoch or store_epoch(conn)) + secrets.token_hex((JOB_ID_DIGITS - EPOCH_DIGITS - CHECK_DIGITS) // 2)
    return body + check_digits(body)


def epoch_of(job_id: str) -> str:
    """The store's epoch job id ``job_id`` was made in (``new_job_id``)."""
    return job_id[:EPOCH_DIGITS]


def lost_in_restart(conn: Redis, job_id: str) -> bool:
    """Whether job ``job_id``, which Redis does not have, was accepted before Redis lost its
    data (restarted without persistence, or emptied): an id aex made (its check digits hold)
    that carries another epoch."""
    return len(job_id) == JOB_ID_DIGITS and checked(job_id) and epoch_of(job_id) != store_epoch(conn)
