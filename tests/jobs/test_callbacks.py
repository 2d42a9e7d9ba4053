"""The callback sender on its own: which URLs pass the allow-list, and delivery against a
real HTTP server on 127.0.0.1 (retries on 429/5xx, none on 4xx or redirects)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.callbacks import check_callback_url, deliver, host_allowed
from jobs.keys import callback_key
from jobs.queues import connect
from jobs.settings import Settings
from models.errors import BadParameterError


@pytest.mark.parametrize(
    "host,allowed,ok",
    [
        ("127.0.0.1", ["127.0.0.1"], True),
        ("hooks.example.org", ["*.example.org"], True),
        ("a.b.example.org", ["*.example.org"], True),
        ("example.org", ["*.example.org"], False),  # the wildcard is for subdomains only
        ("badexample.org", ["*.example.org"], False),
        ("Hooks.Example.ORG.", ["hooks.example.org"], True),
        ("127.0.0.2", ["127.0.0.1"], False),
        ("::1", ["::1"], True),
    ],
)
def test_host_allowed(host, allowed, ok):
    assert host_allowed(host, allowed) is ok


def test_check_callback_url():
    allowed = Settings(callback_allowed_hosts="127.0.0.1, *.example.org").callback_allowed_hosts
    assert allowed == ["127.0.0.1", "*.example.org"]
    assert check_callback_url(" https://x.example.org:8443/h?a=1 ", allowed) == "https://x.example.org:8443/h?a=1"
    assert check_callback_url("http://[::1]:8080/h", ["::1"]) == "http://[::1]:8080/h"
    for url, fragment in [
        ("http://10.0.0.1/h", "not allowed"),
        ("gopher://127.0.0.1/", "http:// or https://"),
        ("http:///h", "no host"),
        ("http://127.0.0.1/" + "a" * 3000, "longer than"),
    ]:
        with pytest.raises(BadParameterError, match=fragment):
            check_callback_url(url, allowed)
    with pytest.raises(BadParameterError, match="disabled"):
        check_callback_url("http://127.0.0.1/h", [])


@pytest.fixture
def server():
    """A loopback HTTP server answering POSTs with the queued statuses (then 200)."""
    state = {"statuses": [], "bodies": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            state["bodies"].append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status = state["statuses"].pop(0) if state["statuses"] else 200
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    "statuses,state,attempts",
    [
        ([503, 429, 500], "delivered", 4),  # transient answers are retried
        ([400], "failed", 1),
        ([302], "failed", 1),  # redirects are not followed (the target could be off the allow-list)
        ([503] * 5, "failed", 4),  # out of attempts
    ],
)
def test_deliver(redis_server, server, statuses, state, attempts):
    conn = connect(f"{redis_server.url}?db=10")
    server["statuses"] = list(statuses)
    meta = {"url": server["url"], "attempts": 4, "timeout": 5.0, "backoff": 0.01}
    record = deliver(conn, "job1", meta, {"job_id": "job1", "status": "finished"}, {"url": server["url"]}, 60)
    assert record["state"] == state and record["attempts"] == attempts
    assert len(server["bodies"]) == attempts and server["bodies"][0] == {"job_id": "job1", "status": "finished"}
    assert json.loads(conn.get(callback_key("job1")))["state"] == state


def test_the_sender_checks_the_url_against_its_own_allow_list(redis_server, server):
    """A job written straight into Redis was never checked by the API: with a policy (as every
    worker and the API send), a host off the sender's allow-list, or any host when callbacks
    are off there, gets nothing."""
    from jobs.callbacks import CallbackPolicy

    conn = connect(f"{redis_server.url}?db=10")
    meta = {"url": server["url"], "attempts": 2, "timeout": 5.0, "backoff": 0.01}
    payload = {"job_id": "job2", "status": "finished"}
    for allowed, fragment in ((["hooks.example.org"], "not allowed"), ([], "disabled")):
        record = deliver(conn, "job2", meta, payload, {"url": server["url"]}, 60, CallbackPolicy(None, allowed))
        assert record["state"] == "failed" and record["attempts"] == 1 and fragment in record["last_error"]
    assert server["bodies"] == []
    record = deliver(conn, "job2", meta, payload, {"url": server["url"]}, 60, CallbackPolicy(None, ["127.0.0.1"]))
    assert record["state"] == "delivered" and server["bodies"] == [payload]


def test_a_sealed_url_is_opened_only_by_the_sender_with_the_key(redis_server, server):
    """``callback_meta`` keeps the URL sealed (its redacted form beside it for views); the
    sender opens it with its cipher; without the key, with another key, or with the seal of
    another job's meta, nothing is sent and the record says why, never the URL."""
    import dataclasses

    from jobs.callbacks import CallbackPolicy, callback_meta, display_url, open_callback_url
    from jobs.crypto import DataCipher, generate_data_key
    from models.errors import DecryptionError

    cipher = DataCipher.from_text(generate_data_key())
    url = server["url"] + "?token=s3cret-canary"
    meta = {**callback_meta(url, 2, 5.0, 0.01, 60, None, cipher), "backoff": 0.01}
    assert "url" not in meta and "s3cret-canary" not in json.dumps(meta)
    assert display_url(meta) == server["url"] and open_callback_url(meta, cipher) == url
    other = callback_meta(url, 2, 5.0, 0.01, 60, None, cipher)
    with pytest.raises(DecryptionError):  # a seal moved to another meta does not open
        open_callback_url({**meta, "seal_id": other["seal_id"]}, cipher)
    conn = connect(f"{redis_server.url}?db=10")
    payload = {"job_id": "job3", "status": "finished"}
    policy = CallbackPolicy(None, ["127.0.0.1"])
    for sender in (policy, dataclasses.replace(policy, cipher=DataCipher.from_text(generate_data_key()))):
        record = deliver(conn, "job3", meta, payload, {}, 60, sender)
        assert record["state"] == "failed" and "callback URL" in record["last_error"]
        assert "s3cret" not in json.dumps(record) and record["url"] == server["url"]
    assert server["bodies"] == []
    record = deliver(conn, "job3", meta, payload, {}, 60, dataclasses.replace(policy, cipher=cipher))
    assert record["state"] == "delivered" and server["bodies"] == [payload]
    assert "s3cret" not in conn.get(callback_key("job3")).decode()
