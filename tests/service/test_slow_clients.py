"""Slow clients, with raw sockets against the API served by uvicorn as `aex serve` serves it: a
body that stalls or trickles is answered 408 within AEX_BODY_TIMEOUT_SECONDS and its connection
closed (nothing of it is held after), a head that stalls is cut at AEX_HEAD_TIMEOUT_SECONDS, and
the connections are bounded (AEX_MAX_CONNECTIONS; one client's: tests/service/test_client_limits.py)."""

from __future__ import annotations

import json
import select
import socket
import time
from urllib.parse import urlsplit

import pytest

from tests.support.rawhttp import read_response
from tests.support.tokens import token_for

pytestmark = pytest.mark.e2e

BODY_TIMEOUT = 2.5
HEAD_TIMEOUT = 1.5
MAX_CONNECTIONS = 4
PER_CLIENT = MAX_CONNECTIONS - 1  # the limit is filled from 127.0.0.1, the extra comes from 127.0.0.2
EXTRA = ("127.0.0.2", 0)
SLACK = 3.0  # scheduling on two shared cores
BOUNDARY = "slowboundary"
TOKEN: list[str] = []  # the admin token of the stack, set by slow_api (a body is read only after it)


@pytest.fixture(scope="module")
def slow_api(service_stack, serve_api) -> tuple[str, int]:
    base = serve_api(
        service_stack.model_copy(
            update={
                "body_timeout_seconds": BODY_TIMEOUT,
                "head_timeout_seconds": HEAD_TIMEOUT,
                "max_connections": MAX_CONNECTIONS,
                "max_connections_per_client": PER_CLIENT,
                "max_upload_bytes": 256 * 1024,
            }
        )
    )
    TOKEN[:] = [token_for(service_stack)]
    url = urlsplit(base)
    return url.hostname, url.port


def request_head(length: int, path: str = "/v1/classify", method: str = "POST") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN[0]}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def form_body(image: bytes) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def test_a_stalled_body_is_answered_408_and_its_connection_closed(slow_api, make_image):
    body = form_body(make_image("PNG", "RGB"))
    for sent in (0, len(body) // 2, len(body) - 3):  # no body, half of it, all but the closing dashes
        with socket.create_connection(slow_api) as sock:
            start = time.monotonic()
            sock.sendall(request_head(len(body)) + body[:sent])
            status, headers, payload, closed = read_response(sock, BODY_TIMEOUT + SLACK)
            elapsed = time.monotonic() - start
        assert status == 408, (sent, payload)
        assert json.loads(payload)["error"]["code"] == "request_timeout"
        assert BODY_TIMEOUT - 0.1 <= elapsed < BODY_TIMEOUT + SLACK, elapsed
        assert headers.get("connection") == "close" and closed, headers


def test_a_trickled_body_has_one_deadline_not_one_per_chunk(slow_api, make_image):
    """One byte every 0.1 s: each chunk is prompt, the whole body is not."""
    body = form_body(make_image("PNG", "RGB"))
    with socket.create_connection(slow_api) as sock:
        start = time.monotonic()
        sock.sendall(request_head(len(body)))
        for i in range(len(body)):
            if select.select([sock], [], [], 0.1)[0]:
                break  # the answer came
            assert time.monotonic() - start < BODY_TIMEOUT + SLACK, "no answer while trickling"
            try:
                sock.sendall(body[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
        status, _, payload, closed = read_response(sock, SLACK)
        elapsed = time.monotonic() - start
    assert status == 408 and json.loads(payload)["error"]["code"] == "request_timeout", payload
    assert elapsed < BODY_TIMEOUT + SLACK and closed


def test_connections_are_bounded_and_freed_by_the_deadline(slow_api, make_image):
    body = form_body(make_image("PNG", "RGB"))
    stalled = []
    try:
        for _ in range(MAX_CONNECTIONS - 1):  # uvicorn counts the new connection itself
            sock = socket.create_connection(slow_api)
            sock.sendall(request_head(len(body)) + body[:100])
            stalled.append(sock)
        time.sleep(0.2)
        with socket.create_connection(slow_api, source_address=EXTRA) as extra:
            extra.sendall(b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n")
            status, _, _, _ = read_response(extra, SLACK)
        assert status == 503  # at once, not after the others' deadline (and before the app's 401)
        assert healthz(slow_api, EXTRA) == 200  # the liveness probe, answered all the same
        for sock in stalled:
            status, _, payload, closed = read_response(sock, BODY_TIMEOUT + SLACK)
            assert status == 408 and closed, payload
    finally:
        for sock in stalled:
            sock.close()
    with socket.create_connection(slow_api) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock, SLACK)[0] == 200


def healthz(address: tuple[str, int], source: tuple[str, int]) -> int:
    """The status of ``GET /healthz`` on a new connection from ``source``."""
    with socket.create_connection(address, source_address=source) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        return read_response(sock, SLACK, wait_for_close=False)[0]


def closed_within(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closes ``sock`` (fails when it is still open after ``timeout``)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {timeout} s") from None
    return time.monotonic() - start


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/classify HTTP/1.1\r\nHost: te", b"GET /healthz HTTP/1.1\r\n"],
    ids=["nothing", "half-a-head", "no-blank-line"],
)
def test_a_stalled_request_head_is_closed(slow_api, sent):
    with socket.create_connection(slow_api) as sock:
        sock.sendall(sent)
        assert closed_within(sock, HEAD_TIMEOUT + SLACK) >= HEAD_TIMEOUT - 0.1


def test_idle_connections_are_bounded_and_freed_by_the_deadline(slow_api):
    idle = [socket.create_connection(slow_api) for _ in range(MAX_CONNECTIONS - 1)]
    try:
        time.sleep(0.2)
        with socket.create_connection(slow_api, source_address=EXTRA) as extra:
            extra.sendall(b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n")
            assert read_response(extra, SLACK)[0] == 503
        assert healthz(slow_api, EXTRA) == 200
        for sock in idle:
            closed_within(sock, HEAD_TIMEOUT + SLACK)
    finally:
        for sock in idle:
            sock.close()
    with socket.create_connection(slow_api) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock, SLACK)[0] == 200


def test_a_kept_alive_connection_serves_requests_until_idle(slow_api):
    with socket.create_connection(slow_api) as sock:
        for _ in range(3):
            time.sleep(HEAD_TIMEOUT / 2)  # under both deadlines each time, over the head's in all
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert read_response(sock, SLACK, wait_for_close=False)[0] == 200


def test_a_whole_body_in_time_is_served(slow_api, make_image):
    body = form_body(make_image("PNG", "RGB", seed=41))
    with socket.create_connection(slow_api) as sock:
        sock.sendall(request_head(len(body)) + body)
        status, _, payload, _ = read_response(sock, 60)
    assert status in (200, 202), payload  # no model named: the default one
    assert json.loads(payload)["kind"] == "classify"
