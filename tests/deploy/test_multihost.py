"""aex across hosts: Redis with TLS and its ACL user on one host, the API on another, two
workers on two more, a client on a fifth, each a network namespace made by the test
(``tests.support.netns``) and every Redis connection ``rediss://`` over the namespace network, with the
README's multi-machine commands (redis-server's flags, ``aex serve --workers 0``,
``python -m worker``).

- A worker's link is cut while it runs a job, for longer than its lease: the job is run again
  on the other worker and ends there; when the link comes back, the cut-off worker's late
  writes are refused by the attempt's fencing token, and the stored end (status, result,
  meta, tokens) is the other worker's, unchanged.
- A worker's host dies (every process in it killed at once) while it runs a job: the job
  ends on the other worker.

Bounded in time (each wait has its limit); the namespaces and every process in them are
removed at the end, also after a failure (and those of earlier runs whose process is gone,
at the start). Needs root: skips without it, except under .ci/run (AEX_REQUIRE_ALL=1).
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from rq.job import Job

from jobs.queues import QUEUE_NAMES, JobKind, connect
from jobs.rqueue.layout import SERIALIZER, live_worker_keys
from tests.support.netns import Network, check_can_make_namespaces, make_tls, redis_server
from tests.support.tokens import bearer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

HOSTS = ["redis", "api", "w1", "w2", "client"]
WORKERS = ("w1", "w2")
REDIS_PORT = 6380
API_PORT = 8000
LEASE_SECONDS = 3  # AEX_JOB_HEARTBEAT_TTL of the workers: a cut-off worker's job is reaped after it
# Steps of the jobs the faults hit: long enough to be running when the fault comes (seconds
# on the tiny model), bounded.
STEPS = 4000
START_SECONDS = 180.0
JOB_SECONDS = 240.0
# After its link comes back, TCP resends the cut-off worker's blocked commands at its next
# retransmission (exponential backoff: up to about a minute after a cut this long).
LATE_WRITE_SECONDS = 240.0
# The `aex` command, run from the repository as `python -m worker` is.
AEX_MAIN = "import sys; from aex.cli import app; sys.argv[0] = 'aex'; app()"


def wait_for(predicate, what: str, timeout: float, logs: dict[str, Path] | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {n} ---\n{p.read_text(errors='replace')[-2500:]}" for n, p in (logs or {}).items())
            raise AssertionError(f"{what} (after {timeout:.0f} s){tails}")
        time.sleep(0.2)


@pytest.fixture
def cluster(tmp_path, service_models):
    """The five hosts with Redis, the API and two workers running; yields what the test needs."""
    check_can_make_namespaces()
    server = redis_server(tmp_path)
    Network.clean_leftovers()
    net = Network(HOSTS)
    logs = {name: tmp_path / f"{name}.log" for name in ("redis", "api", *WORKERS)}
    try:
        net.open()
        yield _start(net, tmp_path, service_models, logs, server)
    finally:
        net.close()


def _start(net: Network, tmp_path: Path, models: Path, logs: dict[str, Path], server: str):
    from jobs.crypto import generate_data_key
    from tests.support.stack import stack_settings

    tls = make_tls(tmp_path, net.address["redis"], "redis")
    password = secrets.token_urlsafe(24)
    data = tmp_path / "redis-data"
    data.mkdir()
    # The README's "Scaling workers across machines" Redis: TLS only, the default user off, the
    # aex ACL user without admin commands, fsync at every write, never evicting.
    net.popen(
        "redis",
        [
            server,
            "--port", "0",
            "--tls-port", str(REDIS_PORT),
            "--bind", net.address["redis"],
            "--tls-cert-file", str(tls["cert"]),
            "--tls-key-file", str(tls["key"]),
            "--tls-ca-cert-file", str(tls["ca"]),
            "--tls-auth-clients", "no",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--maxmemory-policy", "noeviction",
            "--dir", str(data),
            "--user", "default", "off",
            "--user", "aex", "on", f">{password}", "~*", "&*", "+@all", "-@admin", "-@dangerous",
            "+info", "+keys", "+sort", "+client",
        ],
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        logs["redis"],
    )  # fmt: skip
    url = f"rediss://aex:{password}@{net.address['redis']}:{REDIS_PORT}/0?ssl_ca_certs={tls['ca']}"
    settings = stack_settings(
        SimpleNamespace(url="unused"),
        0,
        models,
        redis_url=url,
        job_heartbeat_ttl=LEASE_SECONDS,
        job_retries=2,
        classify_wait_seconds=0.0,
        data_key=generate_data_key(),
    )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AEX_")}
    base_env.update(settings.as_env())
    with net.inside("client"):
        conn = connect(url)
        wait_for(lambda: _answers(conn), "Redis did not answer over TLS", START_SECONDS, logs)
    token_file = tmp_path / "token"
    api_env = {
        **base_env,
        "AEX_HOST": net.address["api"],
        "AEX_PORT": str(API_PORT),
        "AEX_TOKEN_FILE": str(token_file),
    }
    net.popen("api", [sys.executable, "-c", AEX_MAIN, "serve", "--workers", "0"], api_env, logs["api"])
    for name in WORKERS:
        net.popen(name, [sys.executable, "-m", "worker"], base_env, logs[name])
    return SimpleNamespace(net=net, url=url, settings=settings, token_file=token_file, logs=logs)


def _answers(conn) -> bool:
    try:
        return bool(conn.ping())
    except Exception:
        return False


def host_of(net: Network, worker_name: str) -> str:
    """The host whose namespace runs the worker named ``worker_name`` (aex-<hostname>-<pid>)."""
    pid = int(worker_name.rsplit("-", 1)[-1])
    (host,) = [h for h in WORKERS if pid in net.pids(h)]
    return host


def submit(client: httpx.Client, image: bytes) -> str:
    resp = client.post(
        "/v1/explain",
        files={"image": ("x.png", image, "image/png")},
        data={"model": "tiny-rgb", "targets": "predicted", "steps": str(STEPS)},
    )
    assert resp.status_code == 202, resp.text
    return resp.headers["location"]


def job_of(conn, url: str) -> Job:
    return Job.fetch(url.rsplit("/", 1)[-1], connection=conn, serializer=SERIALIZER)


def running_on(client, conn, url: str, logs) -> str:
    """The worker name once the job runs and has made progress."""

    def started():
        view = client.get(url).json()
        assert view["status"] in ("queued", "running"), view
        if view["status"] == "running" and view["progress"] and view["progress"]["done"] > 0:
            return job_of(conn, url).worker_name
        return None

    return wait_for(started, f"job {url} did not start", JOB_SECONDS, logs)


def ended(client, url: str, logs) -> dict:
    def done():
        view = client.get(url).json()
        return view if view["status"] in ("finished", "failed", "cancelled") else None

    return wait_for(done, f"job {url} did not end", JOB_SECONDS, logs)


def stored_end(conn, job_id: str) -> dict:
    """What Redis holds of a job's end: its hash's status, tokens, worker and meta, and its result."""
    fields = conn.hmget(f"rq:job:{job_id}", "status", "aex_attempt", "aex_ended_attempt", "worker_name", "meta")
    job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
    return {"hash": fields, "result": job.return_value()}


def test_a_cut_off_worker_is_fenced_out_and_a_dead_host_s_job_ends_elsewhere(cluster, make_image):
    net, logs = cluster.net, cluster.logs
    with net.inside("client"):
        conn = connect(cluster.url)
        for q in QUEUE_NAMES.values():
            wait_for(
                lambda q=q: len(live_worker_keys(conn, q)) == 2, "two workers did not register", START_SECONDS, logs
            )
        wait_for(cluster.token_file.exists, "aex serve wrote no first admin token", START_SECONDS, logs)
        token = cluster.token_file.read_text().strip()
        base = f"http://{net.address['api']}:{API_PORT}"
        with httpx.Client(base_url=base, headers=bearer(token), timeout=30.0) as client:
            wait_for(lambda: _ready(client), "the API did not become ready", START_SECONDS, logs)
            _cut_link(net, conn, client, make_image("PNG", "RGB", seed=1), logs)
            _kill_host(net, conn, client, make_image("PNG", "RGB", seed=2), logs)


def _ready(client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def _cut_link(net: Network, conn, client, image: bytes, logs) -> None:
    url = submit(client, image)
    job_id = url.rsplit("/", 1)[-1]
    first = running_on(client, conn, url, logs)
    cut_host = host_of(net, first)
    other = next(h for h in WORKERS if h != cut_host)
    net.cut(cut_host)
    try:
        # Its lease runs out; the other worker's clean-up queues it again and runs it to its end.
        view = ended(client, url, logs)
        assert view["status"] == "finished", view
        job = job_of(conn, url)
        assert job.meta["retried"] == 1 and host_of(net, job.worker_name) == other, (job.meta, job.worker_name)
        before = stored_end(conn, job_id)
        status, attempt, ended_attempt, worker, _meta = before["hash"]
        assert status == b"finished" and attempt == ended_attempt and int(attempt) >= 2, before["hash"]
        refusals_before = _refusals(logs[cut_host])
    finally:
        net.restore(cut_host)
    # Back on the network, the cut-off worker finds its attempt fenced out and writes nothing.
    wait_for(
        lambda: _refusals(logs[cut_host]) > refusals_before,
        f"{cut_host} did not report its attempt fenced out after its link came back",
        LATE_WRITE_SECONDS,
        logs,
    )
    after = stored_end(conn, job_id)
    assert after == before, "the cut-off worker's late writes changed the stored end"
    assert client.get(url).json() == view
    # And it serves again: registered on both queues within its TTL.
    for q in QUEUE_NAMES.values():
        wait_for(lambda q=q: len(live_worker_keys(conn, q)) == 2, f"{cut_host} did not come back", START_SECONDS, logs)


def _refusals(log: Path) -> int:
    text = log.read_text(errors="replace")
    return len(re.findall(r"no longer held by this worker|ended elsewhere meanwhile", text))


def _kill_host(net: Network, conn, client, image: bytes, logs) -> None:
    url = submit(client, image)
    victim = host_of(net, running_on(client, conn, url, logs))
    assert net.kill_host(victim), f"no process in {victim}"
    view = ended(client, url, logs)
    assert view["status"] == "finished", view
    job = job_of(conn, url)
    survivor = next(h for h in WORKERS if h != victim)
    assert job.meta["retried"] == 1 and host_of(net, job.worker_name) == survivor, (job.meta, job.worker_name)
    assert live_worker_keys(conn, QUEUE_NAMES[JobKind.EXPLAIN]) != []
