"""The multipart form as the API reads it: a single-valued field given twice, more explanations
than AEX_MAX_EXPLAIN_ROWS (however they are spelled), a body cut before its closing boundary:
each a 400 before anything is queued; repeated ``targets`` are joined."""

from __future__ import annotations

import pytest

from jobs.keys import store_epoch_key
from jobs.queues import connect
from service.schemas import ClassifyParams, ExplainParams, repeatable_fields
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e

# A Redis database no worker serves: a request that passed admission would be refused 503
# (no worker) there; a 400 proves it was refused before.
NO_WORKERS_DB = 13

BOUNDARY = "aexboundary7d1f"


def form(*pairs: tuple[str, str]) -> dict[str, list[str]]:
    """Form fields in order, a name given more than once repeated (httpx: a list value)."""
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name, []).append(value)
    return out


def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    return resp.json()["error"]


@pytest.fixture(scope="module")
def idle(settings_for):
    """A client on an empty database without workers; asserts at the end that nothing was
    ever stored there (no job, no upload; its API key and the audit trail of its requests are
    all there is)."""
    settings = settings_for(NO_WORKERS_DB)
    conn = connect(settings.redis_url)
    conn.flushdb()
    with api_client(settings) as client:
        yield client
    # The store's epoch is set with the first API key (its token carries it: jobs.epoch).
    kept = (b"rq:workers", b"aex:apikey", b"aex:audit", store_epoch_key().encode())
    left = sorted(k.decode() for k in conn.keys("*") if not k.startswith(kept))
    conn.flushdb()
    assert not left, f"a refused request left {left} in Redis"


# --- single-valued fields ------------------------------------------------------------------
def test_only_list_fields_may_repeat():
    assert repeatable_fields(ExplainParams) == {"targets"}
    assert repeatable_fields(ClassifyParams) == set()


VALUES = {
    "model": "tiny-rgb",
    "window_center": "40",
    "window_width": "400",
    "stability_steps": "5",
    "stability_mode": "exact",
    "callback_url": "http://127.0.0.1/cb",
    "top_k": "3",
    "stability": "false",
    "rho": "0.1",
    "steps": "3",
    "layer": "pipe.2",
    "pacs": "orthanc",
    "study_uid": "1.2.3",
    "series_uid": "1.2.3.4",
    "instance_uid": "1.2.3.4.5",
    "store": "true",
}
ROUTE_FIELDS = [
    ("/v1/classify", name) for name in ClassifyParams.model_fields if name != "image" and name in VALUES
] + [("/v1/explain", name) for name in ExplainParams.model_fields if name not in ("image", "targets")]


@pytest.mark.parametrize("path,name", ROUTE_FIELDS, ids=[f"{p.rsplit('/', 1)[1]}-{n}" for p, n in ROUTE_FIELDS])
def test_a_single_valued_field_given_twice_is_refused(idle, make_image, path, name):
    fields = form((name, VALUES[name]), (name, VALUES[name]))
    resp = idle.post(path, files={"image": ("x.png", make_image("PNG", "RGB"), "image/png")}, data=fields)
    err = assert_error(resp, 400, "bad_parameter")
    assert name in err["message"] and "2 times" in err["message"], err


def test_every_single_valued_field_is_covered():
    covered = {n for _, n in ROUTE_FIELDS}
    assert covered == (set(ClassifyParams.model_fields) | set(ExplainParams.model_fields)) - {"image", "targets"}


# --- amplification: count what will be rendered ---------------------------------------------
@pytest.mark.parametrize(
    "targets,fragment",
    [
        (["all"] * 400, "Too many fields"),  # 400 fields: the form's field limit
        (["all"] * 11, "110 explanations"),  # 11 x 10 classes, within the field limit
        ([",".join(["all"] * 400)], "4000 explanations"),  # one field
        ([",".join(["predicted"] * 101)], "101 explanations"),  # a repeated role counts each time
        (["all", "predicted"] + ["cat,dog,ship"] * 4 + [",".join(["all"] * 8)], "103 explanations"),
    ],
    ids=["400-fields", "11-fields", "one-field", "predicted-101", "mixed"],
)
def test_more_explanations_than_the_limit_are_refused_before_queueing(idle, make_image, targets, fragment):
    fields = form(("model", "tiny-rgb"), ("steps", "2"), *[("targets", t) for t in targets])
    resp = idle.post("/v1/explain", files={"image": ("x.png", make_image("PNG", "RGB"), "image/png")}, data=fields)
    err = assert_error(resp, 400, "bad_parameter")
    assert fragment in err["message"], err


def test_the_limit_itself_is_admitted(idle, make_image):
    # 10 x 10 classes = AEX_MAX_EXPLAIN_ROWS exactly: past admission, refused only for want of a worker.
    fields = form(("model", "tiny-rgb"), ("steps", "2"), *[("targets", "all")] * 10)
    resp = idle.post("/v1/explain", files={"image": ("x.png", make_image("PNG", "RGB"), "image/png")}, data=fields)
    assert_error(resp, 503, "service_unavailable")


def test_repeated_targets_are_joined(api, make_image, poll):
    fields = form(("model", "tiny-rgb"), ("steps", "2"), ("targets", "predicted"), ("targets", "cat,3"))
    resp = api.post(
        "/v1/explain", files={"image": ("x.png", make_image("PNG", "RGB", seed=31), "image/png")}, data=fields
    )
    assert resp.status_code in (200, 202), resp.text
    view = poll(api, resp.json()["url"])
    assert view["status"] == "finished", view
    assert [(t["role"], t["class_index"]) for t in view["result"]["targets"]][1:] == [("class", 3), ("class", 3)]
    assert view["result"]["targets"][0]["role"] == "predicted"


# --- a body cut before its closing boundary ----------------------------------------------------
def multipart_body(image: bytes, image_first: bool = True, **fields: str) -> bytes:
    image_part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts = [image_part, *parts] if image_first else [*parts, image_part]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def post_raw(client, body: bytes):
    return client.post(
        "/v1/classify", content=body, headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    )


def cuts(body: bytes) -> dict[str, int]:
    """Where to cut a body (its length after the cut): inside and around every part."""
    closing = body.rindex(f"--{BOUNDARY}--".encode())
    image_at = body.index(b"\x89PNG")
    image_end = body.index(f"\r\n--{BOUNDARY}".encode(), image_at)
    top_k = body.index(b'name="top_k"')
    return {
        "no-closing-boundary": closing,
        "closing-boundary-without-dashes": closing + len(BOUNDARY) + 2,
        "closing-boundary-half": closing + len(BOUNDARY) // 2,
        "image-half": image_at + (image_end - image_at) // 2,
        "image-part-headers": image_at - 20,
        "a-text-field-value": top_k + len('name="top_k"') + 5,
        "a-text-field-headers": top_k + 4,
        "after-the-first-boundary": len(BOUNDARY) + 4,
    }


@pytest.mark.parametrize("image_first", [True, False], ids=["image-first", "image-last"])
def test_a_body_cut_before_its_closing_boundary_is_refused(idle, make_image, image_first):
    """Cut anywhere, a body is refused, never run with the fields that did arrive (the
    parser itself accepts a body without its closing boundary)."""
    body = multipart_body(make_image("PNG", "RGB"), image_first, model="tiny-rgb", top_k="3")
    for name, length in cuts(body).items():
        err = assert_error(post_raw(idle, body[:length]), 400, "bad_parameter")
        assert "closing boundary" in err["message"], (name, err)


def test_a_whole_body_and_its_epilogue_are_accepted(api, make_image):
    body = multipart_body(make_image("PNG", "RGB", seed=32), model="tiny-rgb", top_k="3")
    for whole in (body, body[:-2], body + b"an epilogue, ignored\r\n"):
        resp = post_raw(api, whole)
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["result"]["top"]) == 3
