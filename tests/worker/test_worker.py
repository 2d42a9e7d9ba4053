"""Worker processes under stress: killed mid-job (the job runs again elsewhere, or fails when
no retry is left), asked to stop mid-job, over their time limit, misconfigured. Real Redis,
real `python -m worker` processes (marker e2e)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq.job import Job

from jobs.keys import upload_key
from jobs.queues import QUEUE_NAMES, JobKind, connect
from jobs.rqueue.layout import SERIALIZER, live_worker_keys
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]


def upload(data: bytes, **fields):
    return {"files": {"image": ("x.png", data, "image/png")}, "data": {k: str(v) for k, v in fields.items()}}


def running_on(client, conn, url: str, timeout: float = 60.0) -> int:
    """Wait until the job runs and has made progress; returns the pid of its worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(url).json()
        if view["status"] == "running" and view["progress"] and view["progress"]["done"] > 0:
            job = Job.fetch(view["id"], connection=conn, serializer=SERIALIZER)
            return int(conn.hget(f"rq:worker:{job.worker_name}", "pid"))
        assert view["status"] in ("queued", "running"), view
        time.sleep(0.05)
    raise AssertionError("the job did not start")


def test_a_killed_worker_s_job_runs_again_on_another_and_the_others_go_on(
    settings_for, make_image, poll, start_workers
):
    settings = settings_for(3)
    conn = connect(settings.redis_url)
    procs = start_workers(settings, 2)
    with api_client(settings) as client:
        image = make_image("PNG", "RGB")
        url = client.post("/v1/explain", **upload(image, model="tiny-rgb", targets="predicted", steps=3000)).headers[
            "location"
        ]
        job_id = url.rsplit("/", 1)[-1]
        victim = running_on(client, conn, url)
        assert victim in [p.pid for p in procs]
        os.kill(victim, signal.SIGKILL)

        # The other worker keeps serving.
        for _ in range(3):
            resp = client.post("/v1/classify", **upload(image, model="tiny-rgb"))
            assert resp.status_code == 200 and resp.json()["status"] == "finished", resp.text
        # Once its lease (job_heartbeat_ttl = 2 s) has run out, the killed job is queued again
        # and runs to its end on the other worker, from the upload kept for it.
        view = poll(client, url, timeout=120)
        assert view["status"] == "finished", view
        job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
        assert job.meta["retried"] == 1 and job.worker_name != f"aex-{socket.gethostname()}-{victim}"
        assert not conn.exists(upload_key(job_id)), "the upload is deleted at the job's end"
        # The dead worker leaves the registrations when its short TTL runs out.
        deadline = time.monotonic() + 3 * settings.worker_ttl
        while len(live_worker_keys(conn, QUEUE_NAMES[JobKind.CLASSIFY])) > 1:
            assert time.monotonic() < deadline, "the dead worker is still registered"
            time.sleep(0.5)
        assert 'outcome="retried"' in client.get("/metrics").text


def test_sigterm_lets_the_current_job_finish(settings_for, make_image, poll, start_workers):
    settings = settings_for(4)
    conn = connect(settings.redis_url)
    (worker,) = start_workers(settings, 1)
    with api_client(settings) as client:
        url = client.post(
            "/v1/explain", **upload(make_image("PNG", "RGB"), model="tiny-rgb", targets="predicted", steps=1500)
        ).headers["location"]
        assert running_on(client, conn, url) == worker.pid
        worker.proc.send_signal(signal.SIGTERM)
        view = poll(client, url, timeout=120)
        assert view["status"] == "finished", view
        assert view["progress"]["done"] == 1500 + 2 * (settings.stability_steps + 1)  # search, then stability
        assert worker.proc.wait(30) == 0
        assert live_worker_keys(conn, QUEUE_NAMES[JobKind.CLASSIFY]) == []
        # With no worker left the service says so instead of queueing.
        assert client.get("/readyz").status_code == 503


def test_a_job_over_its_time_limit_fails(settings_for, make_image, poll, start_workers, long_steps):
    settings = settings_for(5, explain_timeout=1)
    start_workers(settings, 1)
    with api_client(settings) as client:
        url = client.post(
            "/v1/explain", **upload(make_image("PNG", "RGB"), model="tiny-rgb", targets="all", steps=long_steps)
        ).headers["location"]
        view = poll(client, url, timeout=60)
        assert view["status"] == "failed" and view["error"]["code"] == "job_timeout", view
        # The worker survives its job's timeout and takes the next one.
        resp = client.post("/v1/classify", **upload(make_image("PNG", "RGB"), model="tiny-rgb"))
        assert resp.status_code == 200


@pytest.mark.parametrize(
    "env,message",
    [
        ({"AEX_MODEL_DIRS": "/no/such/folder"}, "do not exist"),
        ({"AEX_MODEL_DIRS": ""}, "no checkpoints to serve"),
        ({"AEX_REDIS_URL": ""}, "AEX_REDIS_URL"),
        ({"AEX_DATA_KEY": ""}, "AEX_DATA_KEY is not set"),  # never a worker that stores patient data in clear
        ({"AEX_DATA_KEY": "not-a-key"}, "AEX_DATA_KEY must be base64 of 32 random bytes"),
    ],
)
def test_a_misconfigured_worker_stops_with_a_clear_message(settings_for, env, message):
    full = {k: v for k, v in os.environ.items() if not k.startswith("AEX_")}
    full.update(settings_for(6).as_env())
    full.update(env)
    for name in ("AEX_REDIS_URL", "AEX_DATA_KEY"):
        if env.get(name) == "":
            full.pop(name)
    out = subprocess.run(
        [sys.executable, "-m", "worker"], cwd=REPO_ROOT, env=full, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr


def test_when_the_last_worker_dies_its_job_still_ends(settings_for, make_image, poll, start_workers, long_steps):
    """No worker is left to clean up, and no retry (AEX_JOB_RETRIES = 0): the API itself fails
    the job once its lease is over, and sends the job's callback (a real receiver on
    127.0.0.1)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args):
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    settings = settings_for(7, callback_allowed_hosts=["127.0.0.1"], job_retries=0)
    conn = connect(settings.redis_url)
    (worker,) = start_workers(settings, 1)
    try:
        with api_client(settings) as client:
            url = client.post(
                "/v1/explain",
                **upload(
                    make_image("PNG", "RGB"),
                    model="tiny-rgb",
                    targets="all",
                    steps=long_steps,
                    callback_url=f"http://127.0.0.1:{hook.server_address[1]}/done",
                ),
            ).headers["location"]
            assert running_on(client, conn, url) == worker.pid
            worker.proc.kill()
            worker.proc.wait()
            view = poll(client, url, timeout=30)
            assert view["status"] == "failed" and view["error"]["code"] == "worker_lost", view
            assert not conn.exists(upload_key(url.rsplit("/", 1)[-1])), "the upload is deleted at the job's end"
            deadline = time.monotonic() + 30
            while client.get(url).json()["callback"]["state"] != "delivered":
                assert time.monotonic() < deadline, client.get(url).json()["callback"]
                time.sleep(0.05)
            assert [b["status"] for b in bodies] == ["failed"] and bodies[0]["error"]["code"] == "worker_lost"
    finally:
        hook.shutdown()
        hook.server_close()


@pytest.mark.parametrize("forged", ["function", "callback", "webhook"])
def test_a_job_that_is_not_aexs_is_refused_without_running(service_stack, tmp_path, forged):
    """Whoever can write to Redis could queue any importable function: the worker refuses it
    (failed, code job_refused) and runs nothing it names."""
    import time

    from rq import Callback
    from rq.job import Job
    from rq.queue import Queue

    from jobs.queues import QUEUE_NAMES, JobKind, connect
    from jobs.rqueue.layout import SERIALIZER

    conn = connect(service_stack.redis_url)
    queue = Queue(QUEUE_NAMES[JobKind.CLASSIFY], connection=conn, serializer=SERIALIZER)
    marker = tmp_path / "ran"
    if forged == "function":
        job = queue.enqueue("os.makedirs", str(marker))
    elif forged == "webhook":  # aex's own function, but rq would send its end to any address
        from rq.webhook import Webhook

        hook = Webhook(f"http://127.0.0.1:9/{marker.name}", "failed", method="POST")
        job = queue.enqueue(
            "worker.tasks.classify", model="tiny-rgb", webhooks=[hook], meta={"kind": "classify", "model": "tiny-rgb"}
        )
    else:  # aex's own function, but with an rq callback that would import and run os.makedirs
        job = queue.enqueue(
            "worker.tasks.classify",
            model="tiny-rgb",
            on_failure=Callback("os.makedirs"),
            meta={"kind": "classify", "model": "tiny-rgb"},
        )
    deadline = time.monotonic() + 60
    while job.get_status(refresh=True) not in ("failed", "finished") and time.monotonic() < deadline:
        time.sleep(0.05)
    job = Job.fetch(job.id, connection=conn, serializer=SERIALIZER)
    assert job.get_status() == "failed"
    assert job.meta["error"]["code"] == "job_refused"
    assert not marker.exists()
