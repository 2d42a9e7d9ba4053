"""A Redis that evicts keys is refused at start (jobs.queues.check_store_policy): by the check itself, the API's start, `python -m worker` and `aex serve`, on real redis-server processes with each policy."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from jobs.queues import check_store_policy, connect
from models.errors import StoreMisconfiguredError
from tests.support.netns import redis_server

EVICTING = ["allkeys-lru", "volatile-lru"]


@pytest.fixture
def redis_with(tmp_path):
    """redis_with(policy) -> URL: a redis-server of this test with that maxmemory-policy (Unix socket)."""
    procs = []

    def start(policy: str) -> str:
        folder = tmp_path / f"redis-{policy}-{len(procs)}"
        folder.mkdir()
        sock = folder / "redis.sock"
        args = ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(folder), "--maxmemory-policy", policy]
        proc = subprocess.Popen([redis_server(tmp_path), *args], stdout=subprocess.DEVNULL)
        procs.append(proc)
        client = Redis(unix_socket_path=str(sock), socket_connect_timeout=1.0)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except Exception:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        client.close()
        return f"unix://{sock}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("policy", EVICTING)
def test_an_evicting_redis_is_refused_with_why_and_how(redis_with, policy):
    conn = connect(redis_with(policy))
    with pytest.raises(StoreMisconfiguredError) as refused:
        check_store_policy(conn)
    assert refused.value.code == "store_misconfigured"
    assert repr(policy) in refused.value.message and "evict" in refused.value.message
    assert "maxmemory-policy noeviction" in refused.value.message and "API keys" in refused.value.message
    conn.close()


def test_noeviction_passes_and_the_test_stacks_run_it(redis_with, redis_server):
    conn = connect(redis_with("noeviction"))
    assert check_store_policy(conn) == "noeviction"
    conn.close()
    # tests/conftest.py's EmbeddedRedis, read as it is: database 0 holds the session stack's
    # API keys, so nothing here may flush it.
    session = connect(redis_server.url)
    assert check_store_policy(session) == "noeviction"
    session.close()


def test_a_user_denied_config_is_checked_through_info_and_one_denied_both_is_refused(redis_with):
    url = redis_with("allkeys-lru")
    admin = connect(url)
    admin.acl_setuser("noconfig", enabled=True, passwords=["+pw1"], keys=["*"], commands=["+@all", "-config"])
    admin.acl_setuser("blind", enabled=True, passwords=["+pw2"], keys=["*"], commands=["+@all", "-config", "-info"])
    noconfig = Redis(unix_socket_path=url.removeprefix("unix://"), username="noconfig", password="pw1")
    with pytest.raises(StoreMisconfiguredError, match="'allkeys-lru'"):
        check_store_policy(noconfig)
    blind = Redis(unix_socket_path=url.removeprefix("unix://"), username="blind", password="pw2")
    with pytest.raises(StoreMisconfiguredError, match="cannot be read") as refused:
        check_store_policy(blind)
    assert "+config|get" in refused.value.message
    admin.config_set("maxmemory-policy", "noeviction")
    assert check_store_policy(noconfig) == "noeviction"
    with pytest.raises(StoreMisconfiguredError, match="cannot be read"):
        check_store_policy(blind)  # a policy that cannot be read is refused whatever it is
    for client in (admin, noconfig, blind):
        client.close()


@pytest.mark.parametrize("policy", EVICTING)
def test_the_api_refuses_to_start_on_an_evicting_redis(redis_with, settings_on, policy):
    from service.app import create_app

    url = redis_with(policy)
    settings = settings_on(SimpleNamespace(url=url), 0)
    with pytest.raises(StoreMisconfiguredError, match=repr(policy)), TestClient(create_app(settings)):
        pass


def test_the_api_starts_on_noeviction(redis_with, settings_on):
    from service.app import create_app

    settings = settings_on(SimpleNamespace(url=redis_with("noeviction")), 0)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("policy", EVICTING)
def test_aex_serve_refuses_to_start_on_an_evicting_redis(redis_with, settings_on, policy):
    from aex.serve import serve

    settings = settings_on(SimpleNamespace(url=redis_with(policy)), 0, workers=0)
    with pytest.raises(StoreMisconfiguredError, match=repr(policy)):
        serve(settings)  # before any worker or the API starts


@pytest.mark.parametrize("policy", EVICTING)
def test_a_worker_exits_2_on_an_evicting_redis(redis_with, settings_on, worker_process, tmp_path: Path, policy):
    settings = settings_on(SimpleNamespace(url=redis_with(policy)), 0)
    worker = worker_process(settings, tmp_path / "worker.log")
    assert worker.proc.wait(120) == 2
    assert f"error [store_misconfigured]: the job store's maxmemory-policy is {policy!r}" in worker.log()


def test_a_worker_starts_on_noeviction(redis_with, settings_on, worker_process, tmp_path: Path):
    from tests.support.stack import wait_for_workers

    settings = settings_on(SimpleNamespace(url=redis_with("noeviction")), 0)
    worker = worker_process(settings, tmp_path / "worker.log")
    try:
        wait_for_workers(settings, 1, procs=[worker])
    finally:
        assert worker.stop() == 0, worker.log()
