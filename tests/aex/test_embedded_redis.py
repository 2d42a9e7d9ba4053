"""The embedded Redis of `aex serve` (aex/embedded_redis.py) keeps what it holds: a real
redis-server with its append-only file, SIGKILLed and started again by the supervisor, or
stopped and started again as a whole new `aex serve` would, keeps every API key and every
revocation (a revoked token stays refused, never "lost"); ephemeral, it keeps nothing and the
tokens made before answer key_lost. One process at a time may keep its data in a folder: a
second is refused, also while a redis-server left by a killed `aex serve` still runs there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from aex.embedded_redis import LOCK_FILE, EmbeddedRedis
from jobs.epoch import store_epoch
from jobs.queues import connect
from models.errors import BadParameterError, KeyLostError, UnauthenticatedError
from service.auth import ApiKeyStore

REPO_ROOT = Path(__file__).resolve().parents[2]


def sigkill_and_restart(server: EmbeddedRedis) -> None:
    """What the supervisor does when its redis-server dies: a SIGKILL (no clean shutdown, no
    last sync), then a start on the same folder and socket."""
    proc = server.proc
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    server.start()


def refused_not_lost(store: ApiKeyStore, token: str) -> None:
    with pytest.raises(UnauthenticatedError, match="unknown or revoked") as info:
        store.authenticate(token)
    assert not isinstance(info.value, KeyLostError)


def test_a_revoked_key_stays_revoked_across_a_sigkill_and_a_whole_restart(tmp_path):
    folder = tmp_path / "state" / "aex" / "redis"
    server = EmbeddedRedis(folder, persistent=True)
    try:
        server.start()
        assert folder.stat().st_mode & 0o777 == 0o700 and (folder.parent.stat().st_mode & 0o777) == 0o700
        conn = connect(server.url)
        store = ApiKeyStore(conn)
        first = store.ensure_first_admin()
        _, kept = store.create("kept", ["read"])
        store.revoke("admin")
        epoch = store_epoch(conn)
        refused_not_lost(store, first)

        sigkill_and_restart(server)  # the revocation was on disk before Redis answered it
        assert store_epoch(conn) == epoch
        refused_not_lost(store, first)
        assert store.authenticate(kept).id == "kept"
        assert store.ensure_first_admin() is None  # keys exist: nothing is made
        assert (folder / "aex.aof").stat().st_mode & 0o777 == 0o600
        conn.close()
    finally:
        server.stop()
    assert (folder / "aex.aof").is_file()  # a persistent folder stays

    again = EmbeddedRedis(folder, persistent=True)  # `aex serve` started again as a whole
    try:
        again.start()
        conn = connect(again.url)
        store = ApiKeyStore(conn)
        assert store_epoch(conn) == epoch
        refused_not_lost(store, first)
        assert store.authenticate(kept).id == "kept"
        conn.close()
    finally:
        again.stop()


def test_without_persistence_every_earlier_key_is_lost_and_says_so(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    try:
        server.start()
        conn = connect(server.url)
        store = ApiKeyStore(conn)
        first = store.ensure_first_admin()
        _, revoked = store.create("revoked", ["read"])
        store.revoke("revoked")
        sigkill_and_restart(server)  # no append-only file: Redis starts empty, a new epoch
        for token in (first, revoked):
            with pytest.raises(KeyLostError, match="ask an admin for a new key"):
                store.authenticate(token)
        new = store.ensure_first_admin()
        assert new not in (first, revoked) and store.authenticate(new).id == "admin"
        conn.close()
    finally:
        server.stop()
    assert [p.name for p in (tmp_path / "redis").iterdir()] == ["redis.log"]  # no data on disk


def test_one_process_at_a_time_keeps_its_data_in_a_folder(tmp_path):
    folder = tmp_path / "redis"
    first = EmbeddedRedis(folder, persistent=True)
    try:
        with pytest.raises(BadParameterError, match="in use") as info:
            EmbeddedRedis(folder, persistent=True)
        assert f"aex serve pid {os.getpid()}" in info.value.message and "AEX_REDIS_DIR" in info.value.message
    finally:
        first.stop()
    EmbeddedRedis(folder, persistent=True).stop()  # free again once the first stopped


def test_a_redis_server_left_by_a_killed_aex_serve_keeps_its_folder(tmp_path):
    """`aex serve` SIGKILLed leaves its redis-server running (its own session, so that Ctrl-C
    reaches it last): that server still holds the folder's lock, and a new one is refused
    until it is gone; two servers appending to one file would corrupt it."""
    folder = tmp_path / "redis"
    script = (
        "import sys, time\n"
        "from aex.embedded_redis import EmbeddedRedis\n"
        f"EmbeddedRedis({str(folder)!r}, persistent=True).start()\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    orphan = None
    try:
        assert owner.stdout.readline().strip() == "started"
        holders = (folder / LOCK_FILE).read_text()
        orphan = psutil.Process(int(holders.rsplit("redis-server pid ", 1)[1]))
        assert orphan.name().startswith("redis-server")
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
        assert orphan.is_running()
        with pytest.raises(BadParameterError, match="in use") as info:
            EmbeddedRedis(folder, persistent=True)
        assert f"redis-server pid {orphan.pid}" in info.value.message
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(30)
        if orphan is not None and orphan.is_running():
            orphan.kill()
            orphan.wait(30)
    deadline = time.monotonic() + 30
    while True:  # its lock goes with it
        try:
            EmbeddedRedis(folder, persistent=True).stop()
            break
        except BadParameterError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
