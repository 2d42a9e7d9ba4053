"""Result reuse (service/reuse.py) on a real Redis, without a worker process: a finished result indexed within a reuse scope answers a new job of the requester, kept no longer than the result it copies; nothing is reused across scopes, from an unfinished job, from a result about to expire, or with reuse off."""

from __future__ import annotations

import pytest

from jobs.epoch import new_job_id
from jobs.keys import images_key, reused_job_key
from jobs.queues import JobKind
from jobs.rqueue import enqueue, fetch_job, result_ttl_left
from jobs.states import ApiStatus
from service.reuse import MIN_REUSE_TTL_SECONDS, fetch_reused, reuse_index_key, reuse_result
from tests.support.jobs import finish_next

DB = 6
KEY = "c" * 64  # a result cache key (jobs.params.result_cache_key)
SCOPE, OTHER_SCOPE = "a" * 32, "b" * 32
RESULT = {"model": "tiny-rgb", "predicted": {"class_index": 1}, "reused": False, "reused_from": "older"}
OWNER = {"owner": {"kind": "key", "id": "bob", "tenant": None}, "input_sha256": "d" * 64, "reuse_scope": SCOPE}


@pytest.fixture
def settings(settings_for):
    return settings_for(DB)


def queued(conn, kind=JobKind.CLASSIFY) -> str:
    """A job of ``kind`` queued as the API queues one, whose cache key is KEY within SCOPE."""
    job_id = new_job_id(conn)
    meta = {"kind": kind.value, "model": "tiny-rgb", "cache_key": KEY, "reuse_scope": SCOPE}
    enqueue(conn, kind, kind, job_id, {"model": "tiny-rgb"}, meta, 60, 600, 600, "test")
    return job_id


def test_a_finished_result_answers_a_new_finished_job_of_the_requester(conn, settings):
    source = queued(conn)
    assert finish_next(conn, JobKind.CLASSIFY, RESULT, result_ttl=600) == source
    job_id = reuse_result(conn, settings, JobKind.CLASSIFY, "tiny-rgb", KEY, OWNER, SCOPE)
    assert job_id is not None and job_id != source
    assert fetch_job(conn, job_id) is None  # aex's own record, no rq job
    record = fetch_reused(conn, job_id)
    assert (record.kind, record.status, record.model) == (JobKind.CLASSIFY, ApiStatus.FINISHED, "tiny-rgb")
    assert record.result == {"model": "tiny-rgb", "predicted": {"class_index": 1}, "reused": True}  # no reused_from
    assert record.meta["owner"] == OWNER["owner"] and record.meta["result_job"] == source
    assert record.meta["cache_key"] == KEY and record.enqueued_at == record.ended_at
    assert 0 < conn.ttl(reused_job_key(job_id)) <= result_ttl_left(conn, source)  # goes with the source
    assert conn.get(reuse_index_key(SCOPE, KEY)) == source.encode()  # the source stays the indexed one


def test_nothing_is_reused_across_scopes_unfinished_expiring_or_with_reuse_off(conn, settings):
    assert reuse_result(conn, settings, JobKind.CLASSIFY, "tiny-rgb", KEY, OWNER, SCOPE) is None  # no index
    source = queued(conn)
    conn.set(reuse_index_key(SCOPE, KEY), source)  # indexed, but still queued
    assert reuse_result(conn, settings, JobKind.CLASSIFY, "tiny-rgb", KEY, OWNER, SCOPE) is None
    finish_next(conn, JobKind.CLASSIFY, RESULT, result_ttl=600)
    assert reuse_result(conn, settings, JobKind.CLASSIFY, "tiny-rgb", KEY, OWNER, OTHER_SCOPE) is None
    off = settings.model_copy(update={"reuse_results": False})
    assert reuse_result(conn, off, JobKind.CLASSIFY, "tiny-rgb", KEY, OWNER, SCOPE) is None
    conn.expire(f"rq:results:{source}", MIN_REUSE_TTL_SECONDS - 1)  # about to go: not worth answering with
    assert reuse_result(conn, settings, JobKind.CLASSIFY, "tiny-rgb", KEY, OWNER, SCOPE) is None
    assert list(conn.scan_iter(match=reused_job_key("*"))) == []  # no record was written


def test_an_explanation_is_reused_only_while_its_images_are_kept(conn, settings):
    source = queued(conn, JobKind.EXPLAIN)
    finish_next(conn, JobKind.EXPLAIN, RESULT, result_ttl=600)
    assert reuse_result(conn, settings, JobKind.EXPLAIN, "tiny-rgb", KEY, OWNER, SCOPE) is None  # no images
    conn.hset(images_key(source), "gradcam.png", b"sealed png")
    conn.expire(images_key(source), 100)
    job_id = reuse_result(conn, settings, JobKind.EXPLAIN, "tiny-rgb", KEY, OWNER, SCOPE)
    assert job_id is not None and 0 < conn.ttl(reused_job_key(job_id)) <= 100
    assert fetch_reused(conn, job_id).meta["result_job"] == source  # whose images it shows


def test_a_missing_or_partial_record_is_no_job(conn):
    assert fetch_reused(conn, "0" * 32) is None
    conn.hset(reused_job_key("1" * 32), mapping={"kind": "classify", "meta": "{}"})  # no result: not whole
    assert fetch_reused(conn, "1" * 32) is None
