"""Each request's final audit record written before its answer leaves: ``AuditMiddleware`` (every request under the audited paths) and ``record_answer`` (a job route writing its own in the thread pool it runs in anyway); the rules are in ``service.audit``'s docstring.

Torch-free.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.audit import AUDITED_PREFIXES, AuditLog, action_of, note
from service.errors import error_response, status_of, store_refusal, store_unavailable
from service.timing import stage

log = logging.getLogger("aex.audit")


RECORDED = "audit_recorded"  # request state: the status whose final record the route wrote itself
RECORDED_ID = "audit_record_id"  # request state: the stream id of that record


def final_facts(scope) -> dict[str, Any]:
    """What the final record of the request of ``scope`` says besides its status (the
    arguments of ``AuditLog.writing``): its principal and action, the job, model and input
    digest its route noted (the job of its path otherwise), the pending record it replaces, and
    a record of it written already with another status (by its route, ``record_answer``, or
    ahead, ``AnswerAhead``), which gives way to it."""
    state = scope.get("state") or {}
    facts = state.get("audit") or {}
    return {
        "principal": state.get("principal"),
        "action": action_of(scope),
        "job_id": facts.get("job_id") or (scope.get("path_params") or {}).get("job_id"),
        "model": facts.get("model"),
        "input_sha256": facts.get("input_sha256"),
        "pending": state.get("audit_pending"),
        "replaces": state.get(RECORDED_ID),
    }


def write_final(audit: AuditLog, scope, status: int):
    """Write the final record of the request of ``scope`` with ``status`` (replacing its pending
    one); None when written, else the answer that replaces the app's (503 ``store_unavailable``,
    or 500 for an error that is not the store refusing). Blocking."""
    state = scope.get("state") or {}
    try:
        state[RECORDED_ID] = audit.record(status=status, **final_facts(scope))
        return None
    except Exception as exc:  # fail closed: no answer leaves without its record
        what = store_refusal(exc)
        log.error(
            "the audit record of %s could not be written (%s): the request is refused",
            action_of(scope),
            what or type(exc).__name__,
        )
        if what is None:
            return error_response(500, "internal_error", "the audit record of this request could not be written")
        err = store_unavailable(what)
        return error_response(status_of(err.code), err.code, err.message)


class AnswerAhead:
    """The final record of a request whose answer will be 200 once its job has finished (a
    classify: the result), written ahead, in the round trip of its wait for the job's end and
    only if the job finished (``jobs.rqueue.wait_for_end``): the record, its time Redis's
    clock at the write, replaces the pending one atomically with the read of the job's end,
    and costs no round trip of its own, nor a sync to disk when the job ends while the wait
    blocks (Redis writes it to its log with the worker's end). ``record_answer`` then lets the 200
    go as it is; an answer with another status after all (an error raised while the answer
    was built) is recorded with its own status, the record written ahead removed in the same
    transaction, so the trail still tells the status the client got."""

    STATUS = 200

    def __init__(self, request, audit: AuditLog):
        self.request, self.scope, self.audit = request, request.scope, audit

    def writes(self, job_id: str, clock: str):
        """``fill(pipe)``: the writes of the record for job ``job_id``, its time ``clock``
        (the stand-in the writing script replaces). The job is noted for the request's
        record from now on: one that replaces this one names it too."""
        note(self.request, job_id=job_id)
        return self.audit.writing(status=self.STATUS, time_text=clock, **final_facts(self.scope))

    def written(self, stream_id) -> None:
        """After the wait: ``stream_id``, the record's id when it was written (None: the job
        had not finished, nothing was written)."""
        if stream_id is None:
            return
        state = self.scope["state"]
        state[RECORDED] = self.STATUS
        state[RECORDED_ID] = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
        self.audit.written()


def answer_ahead(request) -> AnswerAhead | None:
    """The final record ``request`` may write ahead (``AnswerAhead``); None outside the
    audited paths."""
    audit: AuditLog | None = (request.scope.get("state") or {}).get("audit_log")
    return None if audit is None else AnswerAhead(request, audit)


def record_answer(request, response):
    """Write the final record of ``request`` now, with the status of ``response``, its answer,
    in the calling thread: for a route that runs in the thread pool anyway, which spares the
    middleware's own trip into the pool and back (and the event loop's turns around it) just
    before the answer leaves. Returns ``response``, or the answer that replaces it when the
    record cannot be written (``write_final``); ``AuditMiddleware`` then sends either as it is.
    Outside the audited paths (no ``AuditMiddleware``), ``response`` untouched. Blocking."""
    state = request.scope.get("state")
    audit: AuditLog | None = (state or {}).get("audit_log")
    if audit is None or state.get(RECORDED) == response.status_code:  # none, or written ahead
        return response
    with stage("audit-end"):
        refusal = write_final(audit, request.scope, response.status_code)
    answer = response if refusal is None else refusal
    state[RECORDED] = answer.status_code
    return answer


class AuditMiddleware:
    """Pure ASGI middleware: one audit record per request under ``/v1/`` and ``/metrics``,
    written with the final status before the response starts; a request whose record cannot
    be written is answered 503 ``store_unavailable`` instead (the app's answer is dropped).
    The action is the method and the route template, never the raw path. An answer whose
    record its route wrote already (``record_answer``: the same status) is sent as it is; one
    with another status (an error raised after that write) gets a record of its own, which
    replaces the route's in the same transaction (one record per request, with the status its
    client got)."""

    def __init__(self, app, audit: AuditLog, prefixes: tuple[str, ...] = AUDITED_PREFIXES):
        self.app, self.audit, self.prefixes = app, audit, prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["audit_log"] = self.audit  # for before_acting and record_answer
        refused = False

        async def send_recorded(message):
            nonlocal refused
            if refused:
                return  # the app's answer, replaced by the refusal
            if message["type"] == "http.response.start" and state.get(RECORDED) != message["status"]:
                with stage("audit-end"):
                    refusal = await run_in_threadpool(write_final, self.audit, scope, message["status"])
                if refusal is not None:
                    refused = True
                    await refusal(scope, receive, send)
                    return
            await send(message)

        await self.app(scope, receive, send_recorded)
