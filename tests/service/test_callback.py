"""callback_url: a real HTTP receiver on 127.0.0.1 (http.server in a thread) gets the POST
when a job ends, signed (Standard Webhooks, AEX_CALLBACK_SECRET), after retries on 503, never
retried on 4xx; a reused result's callback names no other job; hosts off the allow-list are
refused at submit time (real Redis, real workers; marker e2e)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.webhooks import parse_callback_secret, verify_signature
from tests.support.tokens import CALLBACK_SECRET, api_client

pytestmark = pytest.mark.e2e


class Receiver:
    """An HTTP server on a free loopback port that answers each POST with the next status of
    ``statuses`` (then 200) and keeps every JSON body it got."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.signed: list[bool] = []  # whether each POST carried a valid signature of its body
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.bodies.append(json.loads(body))
                receiver.paths.append(self.path)
                receiver.signed.append(verify_signature(parse_callback_secret(CALLBACK_SECRET), self.headers, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="callback-receiver")
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/aex?token=t1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(statuses=()):
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture(scope="module")
def client(service_stack):
    settings = service_stack.model_copy(
        update={
            "callback_allowed_hosts": ["127.0.0.1", "*.example.org"],
            "callback_backoff_seconds": 0.2,
            "callback_attempts": 3,
        }
    )
    with api_client(settings) as c:
        yield c


def upload(data: bytes, **fields):
    return {"files": {"image": ("x.png", data, "image/png")}, "data": {k: str(v) for k, v in fields.items()}}


def delivery(client, url: str, states=("delivered", "failed"), timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(url).json()
        if view["callback"] and view["callback"]["state"] in states:
            return view
        assert time.monotonic() < deadline, f"callback still {view['callback']}"
        time.sleep(0.05)


def test_callback_is_retried_after_a_503_then_delivered(client, receiver, make_image, poll):
    hook = receiver([503])
    data = make_image("PNG", "RGB", seed=31)
    resp = client.post(
        "/v1/explain", **upload(data, model="tiny-rgb", targets="predicted", steps=3, callback_url=hook.url)
    )
    assert resp.status_code == 202, resp.text
    # The view shows the URL without its query (a token there stays out of job views).
    assert resp.json()["callback"] == {"url": hook.url.split("?")[0], "state": "waiting", "attempts": 0}
    assert poll(client, resp.headers["location"])["status"] == "finished"
    view = delivery(client, resp.headers["location"])
    job_id = view["id"]
    record = view["callback"]
    assert record["state"] == "delivered" and record["attempts"] == 2 and record["last_status"] == 200
    assert len(hook.bodies) == 2 and hook.bodies[0] == hook.bodies[1]  # the same body, sent again
    assert hook.paths == ["/hooks/aex?token=t1"] * 2
    assert hook.signed == [True, True]  # sent by the worker, signed with the shared secret
    body = hook.bodies[-1]
    assert body["job_id"] == job_id and body["status"] == "finished" and body["kind"] == "explain"
    assert body["model"] == "tiny-rgb" and body["result_url"] == f"/v1/jobs/{job_id}" and body["error"] is None

    # An identical request is answered from that result: the API itself sends its callback.
    again = receiver()
    resp = client.post(
        "/v1/explain", **upload(data, model="tiny-rgb", targets="predicted", steps=3, callback_url=again.url)
    )
    assert resp.status_code == 200 and resp.json()["result"]["reused"] is True
    assert job_id not in resp.text  # never the id of the job whose result it copies
    assert delivery(client, resp.json()["url"])["callback"]["state"] == "delivered"
    assert again.bodies[0]["status"] == "finished" and again.bodies[0]["reused"] is True
    assert job_id not in json.dumps(again.bodies[0]) and again.signed == [True]  # sent by the API, signed


def test_a_4xx_answer_is_not_retried(client, receiver, make_image):
    hook = receiver([404])
    resp = client.post(
        "/v1/classify", **upload(make_image("PNG", "RGB", seed=32), model="tiny-rgb", callback_url=hook.url)
    )
    assert resp.status_code == 200, resp.text
    record = delivery(client, resp.json()["url"])["callback"]
    assert record["state"] == "failed" and record["attempts"] == 1 and record["last_status"] == 404
    time.sleep(1.0)  # longer than the backoff: no second attempt comes
    assert len(hook.bodies) == 1


def test_an_unreachable_receiver_fails_the_delivery_not_the_worker(client, receiver, make_image):
    hook = receiver()
    url = hook.url
    hook.close()  # nobody listens on that port any more
    resp = client.post("/v1/classify", **upload(make_image("PNG", "RGB", seed=33), model="tiny-rgb", callback_url=url))
    assert resp.status_code == 200 and resp.json()["status"] == "finished"
    record = delivery(client, resp.json()["url"])["callback"]
    assert record["state"] == "failed" and record["attempts"] == 3 and record["last_status"] is None
    assert "Connect" in record["last_error"]
    # The workers go on serving.
    assert client.post("/v1/classify", **upload(make_image("PNG", "RGB", seed=34), model="tiny-rgb")).status_code == 200


def test_a_cancelled_job_calls_back_too(client, receiver, make_image, long_steps):
    hook = receiver()
    resp = client.post(
        "/v1/explain",
        **upload(
            make_image("PNG", "RGB", seed=35), model="tiny-rgb", targets="all", steps=long_steps, callback_url=hook.url
        ),
    )
    url = resp.headers["location"]
    deadline = time.monotonic() + 60
    while client.get(url).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.delete(url)
    view = delivery(client, url)
    assert view["status"] == "cancelled" and view["callback"]["state"] == "delivered"
    assert hook.bodies[0]["status"] == "cancelled" and hook.bodies[0]["error"]["code"] == "job_cancelled"


@pytest.mark.parametrize(
    "url,fragment",
    [
        ("http://169.254.169.254/latest/meta-data", "'169.254.169.254' is not allowed"),
        ("http://example.org/hook", "'example.org' is not allowed"),
        ("http://127.0.0.1.evil.net/hook", "not allowed"),
        ("ftp://127.0.0.1/hook", "http:// or https://"),
        ("/relative/hook", "http:// or https://"),
        ("http://127.0.0.1:99999/hook", "not a valid URL"),
    ],
)
def test_callback_urls_off_the_allow_list_are_refused(client, make_image, url, fragment):
    resp = client.post("/v1/explain", **upload(make_image("PNG", "RGB"), model="tiny-rgb", callback_url=url))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "bad_parameter" and fragment in resp.json()["error"]["message"]


def test_callbacks_are_off_by_default(api, make_image):
    off = api.post(
        "/v1/explain", **upload(make_image("PNG", "RGB"), model="tiny-rgb", callback_url="http://127.0.0.1:9/hook")
    )
    assert off.status_code == 400 and "AEX_CALLBACK_ALLOWED_HOSTS is empty" in off.json()["error"]["message"]
