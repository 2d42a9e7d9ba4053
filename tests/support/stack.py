"""Test stacks of the service: their settings (short leases, one torch thread, the session's data key), real ``python -m worker`` processes, waiting for them to register, and polling a job until it ends.

Used by tests/service, tests/worker, tests/pacs, tests/jobs and tests/deploy through the
fixtures of tests/conftest.py (``service_stack``, ``settings_for``, ``start_workers`` ...).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import REPO_ROOT
from tests.support.redisdb import redis_url

# Steps of an explain job meant to run until the test cancels or kills it (minutes even on a
# fast machine; the tiny model does one step in about a millisecond).
LONG_STEPS = 100_000
# Callback hosts of the session stack's workers (and of the API in tests/service/test_callback.py).
CALLBACK_HOSTS = ["127.0.0.1", "*.example.org"]
# Steps of each stability search in the test stacks (the service's default is the ARA's 450).
SERVICE_STABILITY_STEPS = 20


def stack_settings(server, db: int, models: Path, **overrides):
    """Settings of a test stack: short leases and registrations so a dead worker is noticed
    in seconds, one torch thread per worker (the test machine's cores are shared), the
    session's data key and callback secret, and authentication on (the default: clients need a
    token, see ``tests.support.tokens``), with room for many jobs of one principal (the tests
    are one client)."""
    from jobs.settings import Settings
    from tests.support.tokens import CALLBACK_SECRET, DATA_KEY

    base = dict(
        redis_url=redis_url(server, db),
        model_dirs=[models],
        bundled_models=False,
        torch_threads=1,
        worker_ttl=6,
        job_heartbeat_ttl=2,
        maintenance_interval=1,
        classify_wait_seconds=30.0,
        max_explain_steps=LONG_STEPS,
        stability_steps=SERVICE_STABILITY_STEPS,
        log_level="WARNING",
        data_key=DATA_KEY,
        callback_secret=CALLBACK_SECRET,
        max_jobs_per_principal=1000,
    )
    return Settings(**{**base, **overrides})


class WorkerProcess:
    """``python -m worker`` started with the given settings; its output goes to a log file."""

    def __init__(self, settings, log_path: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AEX_")}
        env.update(settings.as_env())
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker"],
            env=env,
            cwd=REPO_ROOT,
            stdout=open(log_path, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_workers(settings, n: int, procs=(), timeout: float = 120.0) -> None:
    """Block until ``n`` live workers serve both queues (or fail with the workers' logs)."""
    from jobs.queues import QUEUE_NAMES, connect
    from jobs.rqueue.layout import live_worker_keys

    conn = connect(settings.redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(live_worker_keys(conn, q)) >= n for q in QUEUE_NAMES.values()):
            return
        dead = [p for p in procs if p.proc.poll() is not None]
        if dead:
            raise AssertionError("a worker exited:\n" + "\n".join(p.log()[-3000:] for p in dead))
        time.sleep(0.2)
    raise AssertionError(f"{n} workers did not register in {timeout} s:\n" + "\n".join(p.log()[-3000:] for p in procs))


def start_workers(settings, n: int, folder: Path) -> list[WorkerProcess]:
    """``n`` worker processes with ``settings`` (logs in ``folder``), registered; the caller
    stops them."""
    procs = [WorkerProcess(settings, folder / f"worker{i}.log") for i in range(n)]
    try:
        wait_for_workers(settings, n, procs)
    except BaseException:
        for p in procs:
            p.stop(timeout=30)
        raise
    return procs


def poll_job(client, url: str, timeout: float = 120.0, until=("finished", "failed", "cancelled")) -> dict:
    """GET ``url`` until the job's status is in ``until``; returns the last view."""
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(url)
        assert resp.status_code == 200, resp.text
        view = resp.json()
        if view["status"] in until:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {view['status']} after {timeout} s: {view}")
        time.sleep(0.05)
