"""A callback URL is sealed at rest: a canary in its query reaches the receiver, and no Redis
value (every key of a persistent embedded Redis, rq's job hash, the result stream and the
reuse record included, compressed and base64 values opened), no append-only file, no job
view and no log line holds it (real Redis with an append-only file, a real worker; marker
e2e)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from jobs import rqueue
from jobs.queues import connect
from tests.service.test_callback import Receiver
from tests.service.test_phi import every_value, openings
from tests.support.stack import WorkerProcess, stack_settings, wait_for_workers
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e

CANARY = "AEXCALLBACKCANARY7f3a"


def delivered(client, url: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(url).json()
        if view["status"] == "finished" and view["callback"] and view["callback"]["state"] in ("delivered", "failed"):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.05)


def test_a_callback_url_is_sealed_in_redis_and_the_append_only_file(tmp_path, service_models, make_image, caplog):
    from aex.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis", persistent=True)
    server.start()
    hook = Receiver()
    worker = None
    try:
        settings = stack_settings(server, 0, service_models, callback_allowed_hosts=["127.0.0.1"], log_level="INFO")
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        wait_for_workers(settings, 1, [worker])
        url = hook.url.replace("token=t1", f"token={CANARY}")
        caplog.set_level(logging.DEBUG)
        image = make_image("PNG", "RGB", seed=77)
        form = {"model": "tiny-rgb", "callback_url": url}
        with api_client(settings) as client:
            first = client.post("/v1/classify", files={"image": ("x.png", image, "image/png")}, data=form)
            assert first.status_code in (200, 202), first.text
            view = delivered(client, first.json()["url"])
            # The same request again is answered from that result: the API sends its callback.
            again = client.post("/v1/classify", files={"image": ("x.png", image, "image/png")}, data=form)
            assert again.status_code == 200 and again.json()["result"]["reused"] is True
            reused = delivered(client, again.json()["url"])
        assert view["callback"]["state"] == reused["callback"]["state"] == "delivered"
        assert view["callback"]["url"] == url.split("?")[0]  # the view shows what it always did
        assert hook.paths == [f"/hooks/aex?token={CANARY}"] * 2 and hook.signed == [True, True]

        conn = connect(settings.redis_url)
        job = rqueue.fetch_job(conn, first.json()["id"])
        assert job is not None and "sealed_url" in job.meta["callback"] and "url" not in job.meta["callback"]
        for text in (first.text, again.text, str(view), str(reused)):
            assert CANARY not in text
        leaks = [
            (key, value[:120]) for key, value in every_value(conn) for v in openings(value) if CANARY.encode() in v
        ]
        assert not leaks, leaks
        conn.close()
        files = [p for p in Path(server.folder).rglob("*") if p.is_file()]
        assert any(".aof" in p.name for p in files), files  # the append-only file is there
        assert not [p for p in files if CANARY.encode() in p.read_bytes()]
        assert CANARY not in caplog.text and CANARY not in worker.log()
    finally:
        if worker is not None:
            worker.stop()
        hook.close()
        server.stop()
