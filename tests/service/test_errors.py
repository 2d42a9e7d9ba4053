"""Every error status of the API, each produced by a real bad input, and the JSON error body."""

from __future__ import annotations

import struct
import zlib

import pytest

from service.metrics import KNOWN_METHODS, method_label
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A complete, valid grey PNG of width x height black pixels (bit depth 1): about 100 KB
    on disk, 900 megapixels once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def post(client, path: str, data: bytes, name: str = "image.png", **fields):
    return client.post(path, files={"image": (name, data, "image/png")}, data={k: str(v) for k, v in fields.items()})


def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) >= {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/explain"])
def test_bad_images(api, make_image, path):
    good = make_image("PNG", "RGB")
    assert_error(post(api, path, good[: len(good) // 2]), 422, "undecodable_image")
    assert_error(post(api, path, b"just some notes, not an image\n" * 10, "notes.png"), 415, "unsupported_media_type")
    assert_error(post(api, path, b""), 415, "unsupported_media_type")
    gif = make_image("PNG", "RGB")  # a real image of a format we do not take
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.open(BytesIO(gif)).save(buf, format="GIF")
    assert_error(post(api, path, buf.getvalue(), "x.gif"), 415, "unsupported_media_type")


def test_decompression_bomb(api):
    bomb = png_bomb()
    assert len(bomb) < 200_000
    err = assert_error(post(api, "/v1/classify", bomb), 422, "decompression_bomb")
    assert "30000" in err["message"] or "bomb" in err["message"]


def test_upload_over_the_limit(service_stack, make_image):
    data = make_image("PNG", "RGB", size=(200, 200))
    small = service_stack.model_copy(update={"max_upload_bytes": len(data) - 1})
    with api_client(small) as client:
        assert_error(post(client, "/v1/classify", data), 413, "upload_too_large")
        assert_error(post(client, "/v1/explain", data), 413, "upload_too_large")
        # The body is refused on its declared length too, before it is read.
        resp = client.post(
            "/v1/classify", content=b"x" * 200_000, headers={"content-type": "multipart/form-data; boundary=zzz"}
        )
        assert_error(resp, 413, "upload_too_large")


def test_unknown_model_and_job(api, make_image):
    assert_error(post(api, "/v1/classify", make_image("PNG", "RGB"), model="resnet-9000"), 404, "unknown_model")
    assert_error(post(api, "/v1/explain", make_image("PNG", "RGB"), model="resnet-9000"), 404, "unknown_model")
    assert_error(api.get("/v1/models/resnet-9000"), 404, "unknown_model")
    for job_id in ("0123456789abcdef0123456789abcdef", "not-a-job", "rq:queue:aex-classify"):
        assert_error(api.get(f"/v1/jobs/{job_id}"), 404, "unknown_job")
        assert_error(api.delete(f"/v1/jobs/{job_id}"), 404, "unknown_job")
        assert_error(api.get(f"/v1/jobs/{job_id}/images/input.png"), 404, "unknown_job")
    assert_error(api.get("/v1/nothing-here"), 404, "not_found")
    assert api.get("/v1/jobs/..%2F..%2Fetc").status_code == 404


def test_unknown_image_of_a_real_job(api, make_image, poll):
    resp = post(api, "/v1/classify", make_image("PNG", "RGB"), model="tiny-rgb")
    url = resp.json()["url"]
    assert_error(api.get(f"{url}/images/input.png"), 404, "unknown_job")  # classify jobs keep no images
    assert_error(api.get(f"{url}/images/secret.txt"), 404, "unknown_job")


@pytest.mark.parametrize(
    "path,fields,fragment",
    [
        ("/v1/classify", {"top_k": 0}, "top_k"),
        ("/v1/classify", {"top_k": "many"}, "top_k"),
        ("/v1/classify", {"colour": "blue"}, "colour"),
        ("/v1/explain", {"rho": -1}, "rho"),
        ("/v1/explain", {"steps": 0}, "steps"),
        ("/v1/explain", {"steps": 10**7}, "AEX_MAX_EXPLAIN_STEPS"),
        ("/v1/explain", {"targets": "predicted,zebra"}, "zebra"),
        ("/v1/explain", {"targets": "42"}, "42"),
        ("/v1/explain", {"targets": " , "}, "no targets"),
        ("/v1/explain", {"layer": "no.such.layer"}, "no.such.layer"),
    ],
)
def test_bad_parameters(api, make_image, path, fields, fragment):
    err = assert_error(post(api, path, make_image("PNG", "RGB"), model="tiny-rgb", **fields), 400, "bad_parameter")
    assert fragment in err["message"]


def test_bad_request_bodies(api, make_image):
    assert_error(api.post("/v1/classify", data={"model": "tiny-rgb"}), 400, "bad_parameter")  # not multipart
    resp = api.post("/v1/classify", files={"picture": ("x.png", make_image("PNG", "RGB"), "image/png")})
    assert "'image'" in assert_error(resp, 400, "bad_parameter")["message"]
    two = api.post(
        "/v1/classify", files=[("image", ("a.png", b"1", "image/png")), ("image", ("b.png", b"2", "image/png"))]
    )
    assert_error(two, 400, "bad_parameter")


def test_redis_gone(tmp_path, service_models, make_image):
    from fastapi.testclient import TestClient

    from jobs.settings import Settings
    from service.app import create_app
    from tests.support.tokens import DATA_KEY, bearer

    gone = Settings(
        redis_url=f"unix://{tmp_path / 'no-redis.sock'}",
        model_dirs=[service_models],
        bundled_models=False,
        data_key=DATA_KEY,
    )
    # API keys live in Redis: without it a token cannot be checked, which is a 503, not a 401.
    with TestClient(create_app(gone), headers=bearer("aex_" + "A" * 43)) as client:
        for resp in (client.get("/v1/models"), client.get("/metrics")):
            assert_error(resp, 503, "store_unavailable")
            assert resp.headers["retry-after"] == "5" and "www-authenticate" not in resp.headers
    # The rest without authentication (AEX_AUTH=off, accepted on loopback): what Redis alone
    # does. Every audited route is refused: its audit record cannot be written.
    with TestClient(create_app(gone.model_copy(update={"auth": "off"}))) as client:
        assert client.get("/healthz").status_code == 200  # alive, but not ready
        assert_error(client.get("/readyz"), 503, "store_unavailable")
        assert_error(post(client, "/v1/classify", make_image("PNG", "RGB"), model="tiny-rgb"), 503, "store_unavailable")
        assert_error(client.get("/v1/jobs/0123456789abcdef0123456789abcdef"), 503, "store_unavailable")
        assert_error(client.get("/metrics"), 503, "store_unavailable")


def test_no_workers(settings_for, make_image):
    # Database 9 of the session's Redis: no worker serves it.
    with api_client(settings_for(9)) as client:
        resp = client.get("/readyz")
        err = assert_error(resp, 503, "service_unavailable")
        assert "classify" in err["message"] and "explain" in err["message"] and resp.headers["retry-after"] == "5"
        for path in ("/v1/classify", "/v1/explain"):
            err = assert_error(
                post(client, path, make_image("PNG", "RGB"), model="tiny-rgb"), 503, "service_unavailable"
            )
            assert "no worker" in err["message"]


def test_metrics_label_values_are_bounded(api):
    """An invented method or a path no route has adds no label value of its own: methods are
    the known ones or "other", routes are templates or "unmatched"."""
    assert method_label("FOO") == method_label("get") == "other" and "GET" in KNOWN_METHODS
    for i, method in enumerate(["FOO", "BREW", "X-" + "A" * 40, "PROPFIND"]):
        assert_error(api.request(method, f"/v1/no-such-{'z' * (i + 1)}"), 404, "not_found")
        assert_error(api.request(method, "/v1/classify"), 405, "method_not_allowed")
        assert_error(api.request(method, f"/v1/jobs/{'0' * 32}"), 405, "method_not_allowed")
    text = api.get("/metrics").text
    series = [line for line in text.splitlines() if line.startswith("aex_http_requests_total{")]
    methods = {line.split('method="', 1)[1].split('"', 1)[0] for line in series}
    routes = {line.split('route="', 1)[1].split('"', 1)[0] for line in series}
    assert "other" in methods and methods <= KNOWN_METHODS | {"other"}, methods
    assert "unmatched" in routes and not any("no-such" in r or "0000" in r for r in routes), routes


def test_redis_errors_are_a_503_when_the_store_refuses_and_a_bare_500_when_they_are_a_bug(redis_server):
    """Real Redis errors raised in routes: an ACL refusal inside a script is the store's
    (503 store_unavailable, Retry-After); a wrong-type error is a bug of ours (500 with the
    catalogue's generic body: neither the Redis text nor the value it was about)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from jobs.queues import connect
    from service.app import install_error_handlers

    admin = connect(f"{redis_server.url}?db=13")
    admin.execute_command("ACL", "SETUSER", "no-set", "on", ">pw", "~*", "&*", "+@all", "-set")
    conn = connect(f"unix://no-set:pw@{redis_server.socket}?db=13")
    app = FastAPI()
    install_error_handlers(app)
    script = conn.register_script("return redis.call('SET', KEYS[1], ARGV[1])")

    @app.get("/acl")
    def acl() -> dict:
        return {"set": script(keys=["aex:probe"], args=["Test^Patient"])}

    @app.get("/bug")
    def bug() -> dict:
        admin.set("aex:probe", "Test^Patient")
        return {"n": conn.incr("aex:probe")}

    try:
        with TestClient(app) as client:
            resp = client.get("/acl")
            assert_error(resp, 503, "store_unavailable")
            assert resp.headers["retry-after"] == "5" and "ACL" in resp.text and "script" not in resp.text
            resp = client.get("/bug")
            err = assert_error(resp, 500, "internal_error")
            assert "error id" in err["message"] and "Patient" not in resp.text and "integer" not in resp.text
    finally:
        admin.delete("aex:probe")
        admin.execute_command("ACL", "DELUSER", "no-set")
        conn.close()
        admin.close()
