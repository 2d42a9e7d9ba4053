"""Schemathesis against the running API (uvicorn on loopback, real Redis and workers): every
operation of the OpenAPI schema, with a bounded number of generated requests sent with an
admin token (so they reach the routes, not only the guard), never answers 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from jobs.settings import Settings
from service.app import create_app
from tests.support.tokens import DATA_KEY, auth_headers

pytestmark = pytest.mark.e2e

# Per operation and generation mode: bounded (the file runs in a couple of minutes on two
# shared cores) and reproducible (derandomized, no example database).
MAX_EXAMPLES = 25


def operation_labels() -> list[tuple[str, str]]:
    """(method, path) of every operation, from the schema of an app that needs no Redis (the
    same schema the running API serves: test_the_served_schema_is_the_one_tested)."""
    app = create_app(
        Settings(redis_url="unix:///nonexistent.sock", bundled_models=False, model_dirs=[], data_key=DATA_KEY)
    )
    return [(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops]


OPERATIONS = operation_labels()


@pytest.fixture(scope="module")
def fuzzed_api(service_stack, serve_api) -> str:
    """The session's stack (its Redis and workers) behind an API whose limits keep each
    accepted job small (a generated request may well be a valid one: its jobs then run on
    the workers), served by uvicorn as `aex serve` serves it."""
    return serve_api(
        service_stack.model_copy(update={"max_explain_steps": 40, "max_explain_rows": 10, "classify_wait_seconds": 1.0})
    )


@pytest.fixture(scope="module")
def served_schema(fuzzed_api):
    return schemathesis.openapi.from_url(f"{fuzzed_api}/openapi.json")


def test_the_served_schema_is_the_one_tested(served_schema):
    served = [(op.method.upper(), op.path) for op in (r.ok() for r in served_schema.get_all_operations())]
    assert sorted(served) == sorted(OPERATIONS)


# Negative requests (each breaking the schema somewhere) only where the schema constrains
# something: a path parameter that is any text cannot be broken.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_no_operation_answers_5xx(served_schema, fuzzed_api, service_stack, method, path, mode):
    # Hypothesis over each operation's strategy, not schemathesis' pytest plugin: its lazy
    # loader (schemathesis.pytest.from_fixture, 4.32) reads Function._nodeid, which pytest 9
    # no longer has; a schema known at import would need the stack before it is started.
    operation = served_schema[path][method]
    # An admin key of its own (made again if a generated DELETE /v1/keys/{name} revoked it).
    headers = auth_headers(service_stack, "fuzz-admin")

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        case.call_and_validate(base_url=fuzzed_api, headers=headers, checks=[not_a_server_error], timeout=60)

    check()
