"""`aex serve` as the README says: one command starts an embedded Redis, a worker and the
API, makes the first admin token and says where it is (never printing it); with that token
it answers POST /v1/classify (without it: 401); Ctrl-C stops all of it; a Redis that dies is
started again and the service carries on by itself.

By default the embedded Redis keeps its data in the per-user state folder (here under a HOME
of the test's own): a revoked key stays revoked across a SIGKILL of Redis and a restart of
`aex serve` as a whole, jobs and keys stay, and a second `aex serve` on the folder is refused.
With --ephemeral it warns at start; a restart loses everything and says so: jobs answer 410
job_lost, keys 401 key_lost, and a NEW first admin token is written (never the earlier one)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_servers() -> set[int]:
    """Running redis-server processes (an exited one that init has not reaped yet is not)."""
    return {
        p.pid
        for p in psutil.process_iter(["name", "status"])
        if (p.info["name"] or "").startswith("redis-server") and p.info["status"] != psutil.STATUS_ZOMBIE
    }


def start_serve(
    service_models, tmp_path, *args: str, log_name="serve.log", **env_extra
) -> tuple[subprocess.Popen, str]:
    """`aex serve` with one worker and the embedded Redis, its token file in ``tmp_path`` and
    HOME ``tmp_path/home`` (so its default Redis folder is ``home/.local/state/aex/redis``);
    returns it once /readyz is 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEX_") and k != "XDG_STATE_HOME"}
    env.update(
        HOME=str(tmp_path / "home"),  # never the real home: the default Redis folder is under it
        AEX_MODEL_DIRS=str(service_models),
        AEX_BUNDLED_MODELS="false",
        AEX_PORT=str(port),
        AEX_WORKERS="1",
        AEX_TORCH_THREADS="1",
        AEX_LOG_LEVEL="WARNING",
        AEX_TOKEN_FILE=str(tmp_path / "config" / "token"),
        **env_extra,
    )
    log = open(tmp_path / log_name, "wb")  # noqa: SIM115 - the child process writes it
    serve = subprocess.Popen(
        [sys.executable, "-m", "aex.cli", "serve", *args], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert serve.poll() is None, (tmp_path / log_name).read_text()
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return serve, base
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, (tmp_path / log_name).read_text()
        time.sleep(0.3)


def stop_serve(serve: subprocess.Popen, tmp_path, log_name="serve.log") -> None:
    serve.send_signal(signal.SIGTERM)
    code = serve.wait(60)
    assert code == 0, (tmp_path / log_name).read_text()


def kill_redis_and_wait(serve: subprocess.Popen, base: str, tmp_path) -> None:
    """SIGKILL the embedded redis-server; return once the supervisor started it again and
    /readyz is 200 (the worker registered again)."""
    (redis,) = [p for p in psutil.Process(serve.pid).children() if p.name().startswith("redis-server")]
    redis.kill()
    redis.wait(30)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
        time.sleep(0.2)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_key(base: str, admin: str, name: str) -> str:
    resp = httpx.post(f"{base}/v1/keys", json={"name": name, "scopes": ["admin"]}, headers=bearer(admin), timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()["token"]


def answer(base: str, token: str, path: str = "/v1/models") -> tuple[int, str | None]:
    """(status, error code) of a GET with ``token``."""
    resp = httpx.get(f"{base}{path}", headers=bearer(token), timeout=30)
    return resp.status_code, resp.json().get("error", {}).get("code") if resp.status_code != 200 else None


def token_of(tmp_path) -> str:
    """The first admin token, read as the CLI reads it (mode 0600 checked)."""
    from aex.credentials import read_token

    path = tmp_path / "config" / "token"
    assert path.stat().st_mode & 0o777 == 0o600
    return read_token(path)


def classify(base: str, image: bytes, token: str | None) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/classify",
        files={"image": ("x.png", image, "image/png")},
        data={"model": "tiny-rgb"},
        headers={"Authorization": f"Bearer {token}"} if token else None,
        timeout=60,
    )


def thread_nices(pid: int) -> list[int]:
    """The nice value of each thread of process ``pid`` (Linux keeps one per thread)."""
    tasks = Path(f"/proc/{pid}/task")
    return [int((t / "stat").read_text().rsplit(")", 1)[1].split()[16]) for t in tasks.iterdir()]


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_aex_serve_answers_classify_and_stops_cleanly(service_models, make_image, tmp_path, stop_signal):
    serve, base = start_serve(service_models, tmp_path)
    try:
        children = psutil.Process(serve.pid).children(recursive=True)
        assert any(p.name().startswith("python") for p in children), "the worker runs as a child process"
        ours = {p.pid for p in children if p.name().startswith("redis-server")}
        assert ours, "an embedded redis-server was started"

        token = token_of(tmp_path)
        printed = (tmp_path / "serve.log").read_text()
        assert str(tmp_path / "config" / "token") in printed and token not in printed
        assert "Access token" in printed and "aex keys create" in printed  # how to use it, and more
        refused = classify(base, make_image("PNG", "RGB"), None)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        resp = classify(base, make_image("PNG", "RGB"), token)
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "finished" and len(resp.json()["result"]["probs"]) == 10
        # Its worker yields the shared cores to the API and Redis: every thread of it (the
        # work loop, its ending and lease threads, torch's) at nice 10, theirs as started.
        own = os.getpriority(os.PRIO_PROCESS, 0)
        (worker,) = [p for p in children if p.name().startswith("python")]
        assert set(thread_nices(worker.pid)) == {max(own, 10)} and len(thread_nices(worker.pid)) >= 3
        assert set(thread_nices(serve.pid)) == {own} and all(set(thread_nices(pid)) == {own} for pid in ours)
    finally:
        serve.send_signal(stop_signal)
        code = serve.wait(60)
    assert code == 0, (tmp_path / "serve.log").read_text()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"workers left running: {alive}"
    time.sleep(0.5)
    assert not (ours & redis_servers()), "the embedded redis-server was left running"


def test_by_default_nothing_is_lost_and_a_revoked_key_stays_revoked(service_models, make_image, tmp_path):
    """The default: the embedded Redis keeps its data in ~/.local/state/aex/redis (0700). A
    key revoked stays revoked after Redis is SIGKILLed and after `aex serve` restarts as a
    whole; the job and the other keys stay; a second `aex serve` on the folder is refused."""
    folder = tmp_path / "home" / ".local" / "state" / "aex" / "redis"
    serve, base = start_serve(service_models, tmp_path)
    try:
        assert folder.stat().st_mode & 0o777 == 0o700 and (folder / "aex.aof").is_file()
        assert (folder / "data.key").stat().st_mode & 0o777 == 0o600
        assert f"keeps jobs, results and API keys in {folder}" in (tmp_path / "serve.log").read_text()
        first = token_of(tmp_path)
        other = make_key(base, first, "other")
        job = classify(base, make_image("PNG", "RGB"), other)
        assert job.status_code == 200, job.text
        revoked = httpx.delete(f"{base}/v1/keys/admin", headers=bearer(other), timeout=10)
        assert revoked.status_code == 200 and answer(base, first) == (401, "unauthenticated")

        # A second `aex serve` on the same folder is refused, saying why, and stops nothing.
        second = subprocess.run(
            [sys.executable, "-m", "aex.cli", "serve", "--port", str(free_port())],
            cwd=REPO_ROOT,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("AEX_") and k != "XDG_STATE_HOME"},
                "HOME": str(tmp_path / "home"),
                "AEX_MODEL_DIRS": str(service_models),
                "AEX_BUNDLED_MODELS": "false",
                "AEX_TOKEN_FILE": str(tmp_path / "second-token"),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2 and "is in use" in second.stderr, second.stderr
        assert f"aex serve pid {serve.pid}" in second.stderr and not (tmp_path / "second-token").exists()

        kill_redis_and_wait(serve, base, tmp_path)
        assert answer(base, first) == (401, "unauthenticated")  # still revoked, not "lost"
        assert answer(base, other) == (200, None)
        assert answer(base, other, f"/v1/jobs/{job.json()['id']}") == (200, None)
    finally:
        stop_serve(serve, tmp_path)
    assert (folder / "aex.aof").is_file()

    serve, base = start_serve(service_models, tmp_path, log_name="serve2.log")  # a whole restart
    try:
        assert answer(base, first) == (401, "unauthenticated")
        assert answer(base, other) == (200, None)
        assert answer(base, other, f"/v1/jobs/{job.json()['id']}") == (200, None)
        assert token_of(tmp_path) == first  # keys exist: no new admin, the file untouched
        assert "holds API keys already" in (tmp_path / "serve2.log").read_text()
    finally:
        stop_serve(serve, tmp_path, "serve2.log")


def test_ephemeral_warns_and_reports_what_a_restart_lost(service_models, make_image, tmp_path, capsys):
    """--ephemeral: a warning at start; killed, the embedded Redis starts again empty; the
    worker registers again by itself (default AEX_WORKER_TTL), /readyz is back, a job accepted
    before answers 410 job_lost (to its owner's lost key too), every earlier key 401 key_lost,
    the revoked first admin token included, and a NEW first admin token is in the file. A
    whole restart does the same again."""
    serve, base = start_serve(service_models, tmp_path, "--ephemeral")
    try:
        printed = (tmp_path / "serve.log").read_text()
        assert "WARNING" in printed and "EPHEMERAL" in printed and "key_lost" in printed
        assert not (tmp_path / "home").exists()  # nothing on disk
        image = make_image("PNG", "RGB")
        first = token_of(tmp_path)
        owner = make_key(base, first, "owner")
        before = classify(base, image, owner)
        assert before.status_code == 200 and before.json()["status"] == "finished", before.text
        assert httpx.delete(f"{base}/v1/keys/admin", headers=bearer(owner), timeout=10).status_code == 200
        assert answer(base, first) == (401, "unauthenticated")

        killed = time.monotonic()
        kill_redis_and_wait(serve, base, tmp_path)
        with capsys.disabled():
            print(f"\naex serve --ephemeral, Redis SIGKILLed: readyz back after {time.monotonic() - killed:.1f} s")
        assert answer(base, first) == (401, "key_lost")  # the revoked token never comes back
        assert answer(base, owner) == (401, "key_lost")
        assert answer(base, owner, f"/v1/jobs/{before.json()['id']}") == (410, "job_lost")
        new = token_of(tmp_path)
        assert new != first and answer(base, new) == (200, None)
        assert answer(base, new, f"/v1/jobs/{before.json()['id']}") == (410, "job_lost")
        after = classify(base, image, new)
        assert after.status_code == 200 and after.json()["status"] == "finished", after.text
        log = (tmp_path / "serve.log").read_text()
        assert "starting it again" in log and "a NEW first admin token" in log and new not in log
    finally:
        stop_serve(serve, tmp_path)

    serve, base = start_serve(service_models, tmp_path, "--ephemeral", log_name="serve2.log")
    try:
        newest = token_of(tmp_path)
        assert newest not in (first, new) and answer(base, newest) == (200, None)
        assert answer(base, new) == (401, "key_lost") and answer(base, first) == (401, "key_lost")
        assert answer(base, newest, f"/v1/jobs/{after.json()['id']}") == (410, "job_lost")
    finally:
        stop_serve(serve, tmp_path, "serve2.log")
    assert not (tmp_path / "home").exists()


SETTLED = """
import asyncio, gc
import uvicorn
from fastapi import FastAPI
from aex.serve import GC_YOUNG_THRESHOLD, _quiet_server

app = FastAPI()
server = _quiet_server(uvicorn)(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
before = gc.get_freeze_count()

async def main():
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    print(before, gc.get_freeze_count(), gc.get_threshold()[0] == GC_YOUNG_THRESHOLD)
    server.should_exit = True
    await serving

asyncio.run(main())
"""


def test_the_served_api_settles_its_heap_once_started():
    """``aex serve``'s uvicorn server, once started, freezes the objects made so far out of the
    cyclic collector's reach and raises its young generation's threshold (``settle_heap``);
    run in a process of its own: the test process is not frozen."""
    out = subprocess.run([sys.executable, "-c", SETTLED], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    before, after, threshold = out.stdout.split()
    assert int(before) == 0 and int(after) > 10_000 and threshold == "True"
