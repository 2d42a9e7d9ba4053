"""Callback hardening (jobs/webhooks.py and its use in jobs/callbacks.py): Standard
Webhooks signatures, redacted URLs, addresses checked after one resolution and pinned, no
proxy from the environment; deliveries go to a real receiver on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.callbacks import CallbackPolicy, deliver, delivery_record, host_allowed
from jobs.keys import callback_key
from jobs.queues import connect
from jobs.settings import Settings
from jobs.webhooks import (
    address_allowed,
    generate_callback_secret,
    parse_callback_secret,
    pin,
    redact_url,
    signature,
    signed_headers,
    verify_signature,
)
from models.errors import BadParameterError

DB = 15


def test_signatures_follow_standard_webhooks():
    # The known answer of the Standard Webhooks reference libraries.
    secret = parse_callback_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    sig = signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = signed_headers(secret, "msg_1", body, timestamp=1_700_000_000)
    assert verify_signature(secret, headers, body, now=1_700_000_010)
    assert not verify_signature(secret, headers, body + b" ", now=1_700_000_010)  # altered body
    assert not verify_signature(secret, headers, body, now=1_700_001_000)  # replayed late
    assert not verify_signature(b"another secret of 16+ bytes", headers, body, now=1_700_000_010)
    fresh = generate_callback_secret()
    assert fresh.startswith("whsec_") and len(parse_callback_secret(fresh)) == 32
    for bad in ["short", "whsec_!!notbase64"]:
        with pytest.raises(BadParameterError, match="AEX_CALLBACK_SECRET"):
            parse_callback_secret(bad)


@pytest.mark.parametrize(
    "url,shown",
    [
        ("https://hooks.example.org/a/b?token=s3cret#frag", "https://hooks.example.org/a/b"),
        ("http://user:pass@10.1.2.3:8080/h?x=1", "http://10.1.2.3:8080/h"),
        ("http://[::1]:9000/hook?t=1", "http://[::1]:9000/hook"),
        ("https://Hooks.Example.ORG", "https://hooks.example.org"),
    ],
)
def test_urls_are_redacted_for_display(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "address,host,allowed,ok",
    [
        ("93.184.216.34", "hooks.example.org", ["hooks.example.org"], True),  # public
        ("10.0.0.5", "hooks.example.org", ["hooks.example.org"], False),  # private: needs a network entry
        ("10.0.0.5", "hooks.example.org", ["hooks.example.org", "10.0.0.0/8"], True),
        ("169.254.169.254", "hooks.example.org", ["hooks.example.org"], False),  # cloud metadata
        ("127.0.0.1", "hooks.example.org", ["hooks.example.org"], False),
        ("127.0.0.1", "127.0.0.1", ["127.0.0.1"], True),
        ("127.0.0.1", "localhost", ["localhost"], True),
        ("::ffff:10.0.0.5", "h.example.org", ["h.example.org"], False),  # mapped IPv4 is still private
        ("0.0.0.0", "h.example.org", ["0.0.0.0/0"], False),  # never the unspecified address
    ],
)
def test_resolved_addresses_are_checked(address, host, allowed, ok):
    assert address_allowed(address, host, allowed) is ok


def test_host_allow_list_takes_networks_for_ip_hosts():
    assert host_allowed("10.1.2.3", ["10.0.0.0/8"]) and not host_allowed("11.1.2.3", ["10.0.0.0/8"])


def fake_resolver(*answers):
    """getaddrinfo that answers each call with the next address (DNS rebinding)."""
    calls = []

    def resolve(host, port, family=0, type=0, proto=0, flags=0):
        if host.replace(".", "").isdigit() or ":" in host:  # an address (the connection itself)
            address = host
        else:
            calls.append(host)
            address = answers[min(len(calls), len(answers)) - 1]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]

    resolve.calls = calls
    return resolve


def test_pin_connects_to_the_checked_address_with_the_original_host():
    target = pin("https://hooks.example.org/h?t=1", ["hooks.example.org"], fake_resolver("93.184.216.34"))
    assert target.url == "https://93.184.216.34:443/h?t=1" and target.address == "93.184.216.34"
    assert target.host_header == "hooks.example.org" and target.sni_hostname == "hooks.example.org"
    with pytest.raises(BadParameterError, match="not a public address"):
        pin("https://hooks.example.org/h", ["hooks.example.org"], fake_resolver("10.0.0.7"))
    v6 = pin("http://h.example.org:81/", ["h.example.org"], fake_resolver("2606:4700::1111"))
    assert v6.url == "http://[2606:4700::1111]:81/" and v6.host_header == "h.example.org:81"


@pytest.fixture
def receiver():
    state = {"statuses": [], "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state["requests"].append({"headers": dict(self.headers), "body": body, "path": self.path})
            self.send_response(state["statuses"].pop(0) if state["statuses"] else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["port"] = httpd.server_address[1]
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_a_signed_delivery_resolves_once_and_ignores_proxies(redis_server, receiver, monkeypatch):
    conn = connect(f"{redis_server.url}?db={DB}")
    conn.flushdb()
    secret = generate_callback_secret()
    policy = CallbackPolicy.from_settings(
        Settings(callback_allowed_hosts="hooks.test,127.0.0.0/8", callback_secret=secret)
    )
    resolver = fake_resolver("127.0.0.1", "10.9.9.9")  # a second answer would rebind elsewhere
    monkeypatch.setattr("jobs.webhooks.socket.getaddrinfo", resolver)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    receiver["statuses"] = [503, 503]
    url = f"http://hooks.test:{receiver['port']}/hooks/aex?token=s3cret"
    meta = {"url": url, "attempts": 3, "timeout": 5.0, "backoff": 0.01}
    payload = {"job_id": "j1", "status": "finished"}
    record = deliver(conn, "j1", meta, payload, {}, 60, policy)
    assert record["state"] == "delivered" and record["attempts"] == 3
    assert resolver.calls == ["hooks.test"]  # one resolution for every attempt
    for req in receiver["requests"]:
        assert req["path"] == "/hooks/aex?token=s3cret" and req["headers"]["Host"] == f"hooks.test:{receiver['port']}"
        assert json.loads(req["body"]) == payload
        assert verify_signature(parse_callback_secret(secret), req["headers"], req["body"])
        assert req["headers"]["webhook-id"] == "j1"
    stored = conn.get(callback_key("j1")).decode()
    assert "s3cret" not in stored and record["url"] == f"http://hooks.test:{receiver['port']}/hooks/aex"
    conn.close()


def test_a_host_that_resolves_to_a_private_address_is_not_called(redis_server, receiver, monkeypatch):
    conn = connect(f"{redis_server.url}?db={DB}")
    monkeypatch.setattr("jobs.webhooks.socket.getaddrinfo", fake_resolver("127.0.0.1"))
    policy = CallbackPolicy(secret=None, allowed_hosts=["hooks.test"])  # no network entry for loopback
    meta = {"url": f"http://hooks.test:{receiver['port']}/h", "attempts": 3, "timeout": 5.0, "backoff": 0.01}
    record = deliver(conn, "j2", meta, {"job_id": "j2"}, {}, 60, policy)
    assert record["state"] == "failed" and record["attempts"] == 1 and "not a public address" in record["last_error"]
    assert receiver["requests"] == []
    conn.close()


def test_the_job_view_shows_the_callback_url_redacted(redis_server):
    from rq.job import Job

    conn = connect(f"{redis_server.url}?db={DB}")
    job = Job.create("worker.tasks.classify", connection=conn, id="j3")
    job.meta["callback"] = {"url": "https://hooks.example.org/h?token=s3cret"}
    assert delivery_record(conn, job) == {"url": "https://hooks.example.org/h", "state": "waiting", "attempts": 0}
    conn.close()
