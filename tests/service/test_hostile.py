"""The hostile corpus (tests/support/hostile.py) through the service: every file sent to /v1/classify
and /v1/explain is answered with a JSON 4xx carrying one of the codes its case expects (and
no patient data in the message), or, for a file that is legitimately fine, with a finished
result whose every number is finite; never a 5xx. Afterwards a good image still classifies
and explains. Also: an exception no handler takes is answered with a fixed message and an
error id (real Redis, real worker processes; marker e2e)."""

from __future__ import annotations

import logging
import math

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.hostile import OK, Case, corpus

pytestmark = pytest.mark.e2e

CASES = list(corpus())
MODEL = "tiny-rgb"
PATIENT = ("PX-HOSTILE", "Hostile^Patient", "Doe^John", "Doe")  # never in a message


def numbers(value) -> list[float]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [n for item in items for n in numbers(item)]


def assert_finite_result(result: dict) -> None:
    probs = list(result["probs"].values()) if "probs" in result else [result["predicted"]["prob"]]
    assert all(isinstance(p, float) and math.isfinite(p) for p in probs), probs
    assert all(math.isfinite(n) for n in numbers(result)), "a number of the result is not finite"


def assert_answer(case: Case, resp, route: str) -> str:
    """The code the service answered ``case`` with (OK for an accepted upload)."""
    assert resp.status_code < 500, f"{case.name} {route}: {resp.status_code} {resp.text}"
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    body = resp.json()
    if resp.status_code >= 400:
        error = body["error"]
        assert error["code"] in case.expect, f"{case.name} {route}: {error}, expected one of {case.expect}"
        assert error["message"] and not any(p in error["message"] for p in PATIENT), error["message"]
        return error["code"]
    assert OK in case.expect, f"{case.name} {route} was accepted ({resp.status_code}), expected one of {case.expect}"
    return OK


def submit(client, route: str, case: Case, **fields):
    files = {"image": (case.filename, case.data, case.media_type)}
    return client.post(route, files=files, data={"model": MODEL, **{k: str(v) for k, v in fields.items()}})


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_upload(api, poll, case):
    explain = submit(api, "/v1/explain", case, targets="predicted", steps=3)
    explained = assert_answer(case, explain, "explain")
    classify = submit(api, "/v1/classify", case)
    classified = assert_answer(case, classify, "classify")
    assert explained == classified, "the two routes check an upload the same way"
    if classified != OK:
        return
    view = classify.json() if classify.status_code == 200 else poll(api, classify.headers["location"])
    assert view["status"] == "finished", view
    assert_finite_result(view["result"])
    # 200: answered at once from an identical earlier request's result (the same bytes may
    # stand in the corpus twice, e.g. an untruncated file); 202: queued.
    view = explain.json() if explain.status_code == 200 else poll(api, explain.headers["location"])
    assert view["status"] == "finished", view
    assert_finite_result(view["result"])


def test_corpus_is_bounded_and_covers_every_class():
    assert 150 <= len(CASES) <= 400
    assert max(len(c.data) for c in CASES) < 2_000_000
    names = {c.name for c in CASES}
    assert len(names) == len(CASES), "case names are unique"
    codes = {code for c in CASES for code in c.expect}
    for code in (
        "unsupported_media_type",
        "undecodable_image",
        "decompression_bomb",
        "extreme_aspect_ratio",
        "non_finite_pixels",
        "invalid_dicom",
        OK,
    ):
        assert code in codes
    for prefix in ("png-cut-", "jpeg-cut-", "tiff-cut-", "bmp-cut-", "webp-cut-", "dicom-cut-"):
        assert sum(n.startswith(prefix) for n in names) >= 15, prefix


def test_good_image_still_classifies_and_explains(api, make_image, poll):
    good = Case("good", make_image("PNG", "RGB"), (OK,), "good.png")
    resp = submit(api, "/v1/classify", good)
    assert resp.status_code == 200, resp.text
    assert_finite_result(resp.json()["result"])
    resp = submit(api, "/v1/explain", good, targets="predicted,runner-up", steps=5)
    assert resp.status_code in (200, 202), resp.text
    view = resp.json() if resp.status_code == 200 else poll(api, resp.headers["location"])
    assert view["status"] == "finished", view
    assert_finite_result(view["result"])


def test_unexpected_exception_is_a_fixed_500_with_an_error_id(service_stack, caplog):
    app = create_app(service_stack)

    text = " ".join(PATIENT)  # what an exception's text could quote: patient data

    @app.get("/boom")
    async def boom():
        raise ValueError(text)

    with caplog.at_level(logging.ERROR, logger="aex.service"), TestClient(app) as client:
        resp = client.get("/boom")
    assert resp.status_code == 500
    body = resp.json()
    assert body["error"]["code"] == "internal_error" and body["error_id"] in body["error"]["message"]
    assert not any(p in resp.text for p in PATIENT)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert body["error_id"] in logged and "ValueError" in logged
    assert not any(p in logged for p in PATIENT)
