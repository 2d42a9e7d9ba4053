"""deploy/'s Redis run for real: redis-server with the rendered ConfigMap's redis.conf and the StatefulSet's
command (its ACL users, their passwords from make-secrets' files as Kubernetes expands
``$(VAR)``), TLS with make-secrets' certificate, on loopback. aex's ACL user does what aex does
(the store policy check, enqueue, claim, fenced progress, finish); KEDA's user reads the
queues' lengths and nothing else; nobody gets in without TLS or a password."""

from __future__ import annotations

import re
import socket
import subprocess
import time

import pytest
import redis as redis_py
from rq.queue import Queue

from jobs.epoch import new_job_id
from jobs.queues import QUEUE_NAMES, JobKind, check_store_policy, connect
from jobs.rqueue import enqueue, lifecycle, running_count, taking
from jobs.rqueue.layout import SERIALIZER
from jobs.rqueue.progress import save_progress
from tests.support.kube import one, read_env_file
from tests.support.netns import redis_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def deployed_redis(rendered, deploy_copy, tmp_path):
    """The rendered Redis on 127.0.0.1: yields (port, {name: password}, CA path)."""
    server = redis_server(tmp_path)
    docs = rendered["gpu"]
    conf = one(docs, "ConfigMap", "aex-redis-config")["data"]["redis.conf"]
    (container,) = one(docs, "StatefulSet", "aex-redis")["spec"]["template"]["spec"]["containers"]
    secrets = deploy_copy / "base" / "secrets"
    env = read_env_file(secrets / "redis.env")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "data").mkdir()
    # The pod's paths, here: its TLS Secret, its data volume; and loopback only.
    conf = conf.replace("/tls/", f"{secrets}/").replace("dir /data", f"dir {tmp_path / 'data'}")
    conf = re.sub(r"^tls-port .*$", f"tls-port {port}", conf, flags=re.M) + "bind 127.0.0.1\n"
    (tmp_path / "redis.conf").write_text(conf)
    command = container["command"]
    assert command[:2] == ["redis-server", "/etc/redis/redis.conf"]
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in command[2:]]  # Kubernetes' expansion
    log = open(tmp_path / "redis.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([server, str(tmp_path / "redis.conf"), *args], stdout=log, stderr=subprocess.STDOUT)
    passwords = {"aex": env["AEX_REDIS_PASSWORD"], env["KEDA_REDIS_USERNAME"]: env["KEDA_REDIS_PASSWORD"]}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "redis.log").read_text()
                assert time.monotonic() < deadline, "redis-server did not listen"
                time.sleep(0.05)
        yield port, passwords, secrets / "ca.crt"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def client(port, user, password, ca) -> redis_py.Redis:
    # The certificate names the Service (aex-redis.aex.svc...), not 127.0.0.1: the chain is
    # verified, the name is not (tests/deploy/test_multihost.py checks names over rediss://).
    return redis_py.Redis(
        host="127.0.0.1",
        port=port,
        username=user,
        password=password,
        ssl=True,
        ssl_ca_certs=str(ca),
        ssl_check_hostname=False,
        socket_timeout=10,
    )


def test_aex_s_user_does_all_aex_does(deployed_redis):
    port, passwords, ca = deployed_redis
    url = f"rediss://aex:{passwords['aex']}@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_check_hostname=false"
    conn = connect(url)
    assert check_store_policy(conn) == "noeviction"  # read through INFO: the user may not run CONFIG
    assert conn.info("persistence")["aof_enabled"] == 1
    with pytest.raises(redis_py.exceptions.NoPermissionError):
        conn.config_get("appendfsync")  # no admin commands
    job_id = new_job_id(conn)
    enqueue(conn, JobKind.EXPLAIN, JobKind.EXPLAIN, job_id, {"model": "m"}, {"kind": "explain"}, 60, 60, 60, "t")
    queue = Queue(QUEUE_NAMES[JobKind.EXPLAIN], connection=conn, serializer=SERIALIZER)
    job = taking.take(conn, queue)
    attempt = lifecycle.claim(conn, job, queue, "w1", 30)
    assert attempt is not None and running_count(conn, JobKind.EXPLAIN) == 1
    job.meta["progress"] = {"done": 1, "total": 2, "phase": "search"}
    assert save_progress(conn, job)  # a Lua script: allowed to this user
    assert lifecycle.finish(conn, attempt, {"ok": True}, 60)
    assert conn.hget(f"rq:job:{job_id}", "status") == b"finished"


def test_keda_s_user_reads_the_queue_lengths_and_nothing_else(deployed_redis):
    port, passwords, ca = deployed_redis
    aex = client(port, "aex", passwords["aex"], ca)
    aex.rpush("rq:queue:aex-explain", "job-1")
    aex.hset("rq:job:job-1", "data", "secret")
    keda = client(port, "keda", passwords["keda"], ca)
    assert keda.ping() and keda.llen("rq:queue:aex-explain") == 1 and keda.llen("rq:queue:aex-classify") == 0
    for denied in (
        lambda: keda.lrange("rq:queue:aex-explain", 0, -1),
        lambda: keda.hgetall("rq:job:job-1"),
        lambda: keda.llen("rq:job:job-1"),
        lambda: keda.keys("*"),
        lambda: keda.rpush("rq:queue:aex-explain", "forged"),
    ):
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            denied()


def test_nobody_gets_in_without_tls_or_a_password(deployed_redis):
    port, passwords, ca = deployed_redis
    with pytest.raises(redis_py.exceptions.AuthenticationError):
        client(port, None, None, ca).ping()  # the default user is off
    with pytest.raises(redis_py.exceptions.AuthenticationError):
        client(port, "aex", "wrong", ca).ping()
    plain = redis_py.Redis(host="127.0.0.1", port=port, username="aex", password=passwords["aex"], socket_timeout=3)
    with pytest.raises(redis_py.exceptions.ConnectionError):
        plain.ping()
