"""One client cannot starve another: the API served by uvicorn as `aex serve` serves it
(service.server), with clients on distinct loopback addresses (Linux routes all of 127/8 to
lo; each client socket is bound to its source address before it connects).

A client holds at most AEX_MAX_CONNECTIONS_PER_CLIENT connections (beyond: 429
``too_many_connections`` at once, and closed), its trickled heads are cut at
AEX_HEAD_TIMEOUT_SECONDS however their bytes come, other clients' ``/healthz`` and
authenticated requests are answered meanwhile, ``/healthz`` even when AEX_MAX_CONNECTIONS is
reached, and a client's count goes back to zero whatever ended its connections. Every wait is
bounded; nothing measures time.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

import pytest

from tests.support.rawhttp import read_response
from tests.support.tokens import token_for

pytestmark = pytest.mark.e2e

DB = 13  # no other test uses it (flushed around each test by redis_db)
MAX_CONNECTIONS = 12
PER_CLIENT = 4
WAIT = 30.0  # the bound of every wait, never a measure
# Deadlines no test outlives (the limits are checked with heads that stay open meanwhile), and
# short ones (the deadline is what is checked).
LONG = {"head_timeout_seconds": 300.0, "body_timeout_seconds": 600.0}
SHORT = {"head_timeout_seconds": 1.0, "body_timeout_seconds": 2.0}
# A head whose end, trickled a byte every TRICKLE seconds, would come long after any deadline here.
SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 400 + b"\r\n\r\n"
TRICKLE = 0.1
PIPELINED = 8  # requests for a 1.7 MB answer each: more than the socket buffers hold (4 MB)


def client(n: int) -> tuple[str, int]:
    """The source address of client ``n``: 127.0.0.n, any port."""
    return (f"127.0.0.{n}", 0)


@pytest.fixture
def api_on(redis_db, settings_for, serve_api):
    """api_on(**overrides) -> ((host, port), admin token): the API on database DB with
    MAX_CONNECTIONS, PER_CLIENT and ``overrides``."""
    redis_db(DB)

    def start(**overrides):
        settings = settings_for(DB, max_connections=MAX_CONNECTIONS, max_connections_per_client=PER_CLIENT, **overrides)
        url = urlsplit(serve_api(settings))
        return (url.hostname, url.port), token_for(settings)

    return start


def connect(address, source) -> socket.socket:
    return socket.create_connection(address, timeout=WAIT, source_address=source)


def get(path: str, token: str | None = None, close: bool = False) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{auth}{connection}\r\n".encode()


def status_from(address, source, path: str, token: str | None = None) -> int:
    """The status of ``GET path`` on a new connection from ``source``."""
    with connect(address, source) as sock:
        sock.sendall(get(path, token))
        return read_response(sock, WAIT, wait_for_close=False)[0]


def assert_refused(sock: socket.socket) -> None:
    """``sock`` was answered 429 too_many_connections, with Retry-After, and closed."""
    status, headers, body, closed = read_response(sock, WAIT)
    assert status == 429, (status, body)
    assert json.loads(body)["error"]["code"] == "too_many_connections"
    assert int(headers["retry-after"]) > 0 and headers["connection"] == "close", headers
    assert closed


def holds_its_limit(address, source) -> bool:
    """Whether ``source`` can hold PER_CLIENT connections at once, each of them served, and is
    refused one more: its count is back to zero (a count that leaked refuses one of them)."""
    socks = []
    try:
        for _ in range(PER_CLIENT):
            socks.append(connect(address, source))
            socks[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: te")  # held open, half a head
        with connect(address, source) as extra:
            if read_response(extra, WAIT)[0] != 429:
                return False
        statuses = []
        for sock in socks:
            sock.sendall(b"st\r\n\r\n")
            statuses.append(read_response(sock, WAIT, wait_for_close=False)[0])
        return statuses == [200] * PER_CLIENT
    except (AssertionError, OSError):  # closed without an answer: a deadline ran out meanwhile
        return False
    finally:
        for sock in socks:
            sock.close()


def wait_until_it_holds_its_limit(address, source) -> None:
    """Bounded wait: the server sees a client's closes a moment after the client makes them."""
    deadline = time.monotonic() + WAIT
    while not holds_its_limit(address, source):
        assert time.monotonic() < deadline, f"client {source[0]} never got its {PER_CLIENT} connections back"
        time.sleep(0.1)


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0), as a client that crashes would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_beyond_its_limit_is_refused_and_others_are_served(api_on):
    address, token = api_on(**LONG)
    greedy, other = client(2), client(3)
    held = [connect(address, greedy) for _ in range(PER_CLIENT)]
    try:
        for sock in held:
            sock.sendall(b"GET /v1/mod")  # heads that do not end while the others are tried
        for _ in range(2 * MAX_CONNECTIONS):  # more than the whole server holds
            with connect(address, greedy) as sock:
                sock.sendall(get("/healthz"))
                assert_refused(sock)
        for _ in range(3):
            assert status_from(address, other, "/healthz") == 200
            assert status_from(address, other, "/v1/keys", token) == 200
        # The limit is per client: the other one holds as many at once.
        wait_until_it_holds_its_limit(address, other)
        # The greedy client's held connections were served all along, just slowly.
        for sock in held:
            sock.sendall(f"els HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            assert read_response(sock, WAIT, wait_for_close=False)[0] == 200
    finally:
        for sock in held:
            sock.close()
    wait_until_it_holds_its_limit(address, greedy)


def test_healthz_is_answered_when_the_server_is_full(api_on):
    address, token = api_on(**LONG)
    sources = [client(4)] * PER_CLIENT + [client(5)] * PER_CLIENT + [client(6)] * 3
    assert len(sources) == MAX_CONNECTIONS - 1  # uvicorn counts the probing connection too
    held = [connect(address, source) for source in sources]
    try:
        for sock in held:
            sock.sendall(b"GET /v1/mod")
        probe = client(7)
        assert status_from(address, probe, "/v1/keys", token) == 503  # uvicorn's, before the app
        assert status_from(address, probe, "/healthz") == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + WAIT
    while status_from(address, client(7), "/v1/keys", token) != 200:
        assert time.monotonic() < deadline, "the server stayed full after its clients left"
        time.sleep(0.1)


def test_a_clients_count_returns_to_zero_whatever_ends_its_connections(api_on, make_image):
    address, token = api_on(**LONG)
    me = client(8)

    with connect(address, me) as sock:  # kept alive, then closed by the client
        for _ in range(2):
            sock.sendall(get("/healthz"))
            assert read_response(sock, WAIT, wait_for_close=False)[0] == 200
    with connect(address, me) as sock:  # closed by the server after its answer
        sock.sendall(get("/healthz", close=True))
        assert read_response(sock, WAIT)[3]
    with connect(address, me) as sock:  # not HTTP: 400 from uvicorn, closed
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert read_response(sock, WAIT)[0] == 400
    with connect(address, me) as sock:  # refused by the app
        sock.sendall(get("/v1/keys", "not-a-token", close=True))
        assert read_response(sock, WAIT)[0] == 401
    # Reset by the client once the server has it (a reset before then ends a connection the
    # server never counted): after an answer, in the middle of the next head ...
    sock = connect(address, me)
    sock.sendall(get("/healthz"))
    assert read_response(sock, WAIT, wait_for_close=False)[0] == 200
    sock.sendall(b"GET /heal")
    reset(sock)
    # ... and in the middle of a body the app is reading (it asks for the body: 100 Continue).
    sock = connect(address, me)
    sock.sendall(
        f"POST /v1/classify HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\nExpect: 100-continue\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n".encode()
    )
    assert read_response(sock, WAIT, wait_for_close=False)[0] == 100
    sock.sendall(b"--b\r\n")
    reset(sock)
    with connect(address, me) as sock:  # half-closed by the client in the middle of a head
        sock.sendall(b"GET /heal")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(WAIT)
        assert sock.recv(1) == b""
    held = [connect(address, me) for _ in range(PER_CLIENT)]  # refusals, answered and reset
    try:
        for sock in held:
            sock.sendall(b"GET /heal")
        for _ in range(3 * PER_CLIENT):
            with connect(address, me) as sock:
                assert_refused(sock)
        for _ in range(3 * PER_CLIENT):
            sock = connect(address, me)
            sock.sendall(get("/healthz"))
            reset(sock)  # before reading the refusal, or even before it came
    finally:
        for sock in held:
            sock.close()
    wait_until_it_holds_its_limit(address, me)


def test_a_trickled_head_is_cut_at_the_head_deadline(api_on):
    address, _ = api_on(**SHORT)
    socks = [connect(address, client(9)) for _ in range(PER_CLIENT)]
    sent = [0] * len(socks)
    open_ = set(range(len(socks)))
    try:
        deadline = time.monotonic() + WAIT
        while open_:
            assert time.monotonic() < deadline, "a trickled head was never cut"
            for i in sorted(open_):
                if select.select([socks[i]], [], [], 0)[0]:
                    with contextlib.suppress(ConnectionResetError):
                        assert socks[i].recv(65536) == b"", "answered instead of cut"
                    open_.discard(i)
                    continue
                try:
                    socks[i].sendall(SLOW_HEAD[sent[i] : sent[i] + 1])  # one byte at a time
                    sent[i] += 1
                except (BrokenPipeError, ConnectionResetError):
                    open_.discard(i)
            time.sleep(TRICKLE)
    finally:
        for sock in socks:
            sock.close()
    # Every one was still sending its head, a byte at a time, when it was cut.
    assert all(0 < n < len(SLOW_HEAD) for n in sent), sent
    wait_until_it_holds_its_limit(address, client(9))


def test_the_unread_body_of_an_answered_request_is_cut(api_on):
    """A route that answers without reading the body (here /healthz): the rest of the body and
    the next head share the head deadline, however the body's bytes trickle."""
    address, _ = api_on(**SHORT)
    body_length = 100_000
    with connect(address, client(10)) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: {body_length}\r\n\r\n".encode())
        assert read_response(sock, WAIT, wait_for_close=False)[0] == 200
        sent, deadline = 0, time.monotonic() + WAIT
        while not select.select([sock], [], [], 0)[0]:
            assert time.monotonic() < deadline, "the connection was kept for a body nobody reads"
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            time.sleep(TRICKLE)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(65536) == b""
    assert 0 < sent < body_length


class Trickler(threading.Thread):
    """A client that keeps ``n`` connections open, trickling SLOW_HEAD a byte every TRICKLE
    seconds on each and opening a new one whenever one ends; ``ends`` counts how they ended:
    ``refused`` (answered 429), ``cut`` (closed without an answer: the head deadline), ``reset``
    (reset without an answer: a refusal beyond those that may linger, or a cut that met a
    byte of ours in flight) or what else came."""

    def __init__(self, address, source, n: int) -> None:
        super().__init__(daemon=True, name="trickler")
        self.address, self.source, self.n = address, source, n
        self.ends: Counter[str] = Counter()
        self.stop = threading.Event()

    def end(self, sock: socket.socket, got: bytes, was_reset: bool) -> None:
        if not got:
            self.ends["reset" if was_reset else "cut"] += 1
        elif got.startswith(b"HTTP/1.1 429 "):
            self.ends["refused"] += 1
        else:
            self.ends[got[:40].decode("latin-1")] += 1
        sock.close()

    def run(self) -> None:
        live: dict[socket.socket, list] = {}  # socket -> [bytes of the head sent, bytes received]
        try:
            while not self.stop.is_set():
                while len(live) < self.n:
                    live[connect(self.address, self.source)] = [0, b""]
                for sock in select.select(list(live), [], [], 0)[0]:
                    try:
                        data, was_reset = sock.recv(65536), False
                    except ConnectionResetError:
                        data, was_reset = b"", True
                    live[sock][1] += data
                    if not data:
                        self.end(sock, live.pop(sock)[1], was_reset)
                for sock, state in list(live.items()):
                    try:
                        sock.sendall(SLOW_HEAD[state[0] : state[0] + 1])
                        state[0] += 1
                    except (BrokenPipeError, ConnectionResetError):
                        self.end(sock, live.pop(sock)[1], was_reset=True)
                time.sleep(TRICKLE)
        finally:
            for sock in live:
                sock.close()


def test_a_client_that_trickles_heads_and_reconnects_does_not_starve_another(api_on):
    """The attack of issue 17: more slow connections from one address than the whole server
    holds, opened again as soon as they are cut."""
    address, token = api_on(**SHORT)
    trickler = Trickler(address, client(11), 2 * MAX_CONNECTIONS)
    trickler.start()
    try:
        deadline = time.monotonic() + WAIT
        while trickler.ends["refused"] < 1:  # it holds its limit, and more are refused
            assert trickler.is_alive() and time.monotonic() < deadline, dict(trickler.ends)
            time.sleep(TRICKLE)
        for _ in range(5):
            assert status_from(address, client(12), "/healthz") == 200
            assert status_from(address, client(12), "/v1/keys", token) == 200
        while trickler.ends["cut"] < 2 * PER_CLIENT:  # its connections cut, reopened and cut again
            assert trickler.is_alive() and time.monotonic() < deadline, dict(trickler.ends)
            time.sleep(TRICKLE)
        assert status_from(address, client(12), "/v1/keys", token) == 200
    finally:
        trickler.stop.set()
        trickler.join(WAIT)
    assert set(trickler.ends) <= {"refused", "cut", "reset"}, dict(trickler.ends)  # never a head served
    wait_until_it_holds_its_limit(address, client(11))


def test_a_client_that_does_not_read_its_answers_is_cut(api_on):
    """Answers larger than the socket buffers (Swagger UI's script, no token needed, asked for
    PIPELINED times at once) to a client that reads none of them: uvicorn alone would wait for
    ever to send the rest."""
    address, _ = api_on(**SHORT)
    me = client(13)
    with connect(address, client(12)) as reader:  # the answer's size, read by a client that reads
        reader.sendall(get("/docs/swagger-ui-bundle.js"))
        status, _, script, _ = read_response(reader, WAIT, wait_for_close=False)
    assert status == 200 and PIPELINED * len(script) > 2 * 4 * 1024 * 1024, len(script)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.bind(me)
    sock.connect(address)
    try:
        sock.sendall(get("/docs/swagger-ui-bundle.js") * PIPELINED)
        wait_until_it_holds_its_limit(address, me)  # let go while its answers lie unread
        received = 0
        sock.settimeout(WAIT)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
    finally:
        sock.close()
    assert received < PIPELINED * len(script)
