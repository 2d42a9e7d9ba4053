"""`aex serve` as the README says: one command starts an embedded Redis, a worker and the
API, makes the first admin token and says where it is (never printing it); with that token
it answers POST /v1/classify (without it: 401); Ctrl-C stops all of it; a Redis that dies is
started again and the service carries on by itself, the token still working."""

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


def start_serve(service_models, tmp_path, **env_extra) -> tuple[subprocess.Popen, str]:
    """`aex serve` with one worker and the embedded Redis, its token file in ``tmp_path``;
    returns it once /readyz is 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEX_")}  # no AEX_REDIS_URL: embedded
    env.update(
        AEX_MODEL_DIRS=str(service_models),
        AEX_BUNDLED_MODELS="false",
        AEX_PORT=str(port),
        AEX_WORKERS="1",
        AEX_TORCH_THREADS="1",
        AEX_LOG_LEVEL="WARNING",
        AEX_TOKEN_FILE=str(tmp_path / "config" / "token"),
        **env_extra,
    )
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the child process writes it
    serve = subprocess.Popen(
        [sys.executable, "-m", "aex.cli", "serve"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return serve, base
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
        time.sleep(0.3)


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
    finally:
        serve.send_signal(stop_signal)
        code = serve.wait(60)
    assert code == 0, (tmp_path / "serve.log").read_text()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"workers left running: {alive}"
    time.sleep(0.5)
    assert not (ours & redis_servers()), "the embedded redis-server was left running"


def test_aex_serve_starts_its_redis_again_and_reports_the_jobs_it_lost(service_models, make_image, tmp_path, capsys):
    """Without AEX_REDIS_DIR the embedded Redis has no persistence: killed, it is started
    again empty; the worker registers again by itself (default AEX_WORKER_TTL), /readyz is
    back within 30 s, and a job accepted before answers 410 job_lost, not "expired"."""
    serve, base = start_serve(service_models, tmp_path)
    try:
        image = make_image("PNG", "RGB")
        token = token_of(tmp_path)
        before = classify(base, image, token)
        assert before.status_code == 200 and before.json()["status"] == "finished", before.text
        (redis,) = [p for p in psutil.Process(serve.pid).children() if p.name().startswith("redis-server")]
        redis.kill()
        killed = time.monotonic()
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - killed < 30, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        with capsys.disabled():
            print(f"\naex serve, Redis SIGKILLed (no persistence): readyz back after {time.monotonic() - killed:.1f} s")
        # The first admin key is back in the empty Redis, with the same token.
        auth = {"Authorization": f"Bearer {token}"}
        lost = httpx.get(f"{base}/v1/jobs/{before.json()['id']}", headers=auth, timeout=10)
        assert lost.status_code == 410 and lost.json()["error"]["code"] == "job_lost", lost.text
        assert token_of(tmp_path) == token
        after = classify(base, image, token)
        assert after.status_code == 200 and after.json()["status"] == "finished", after.text
        assert "starting it again" in (tmp_path / "serve.log").read_text()
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(60)
    assert code == 0, (tmp_path / "serve.log").read_text()
