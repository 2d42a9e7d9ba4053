"""``aex serve``: Redis (embedded unless AEX_REDIS_URL is set), N workers and the API in one
command, stopped cleanly on Ctrl-C / SIGTERM.

Before anything starts, the auth settings are checked, the embedded Redis's folder is claimed
and the data key is settled; once Redis answers, the first admin token is made when none exists
(``aex.bootstrap``: its file's path is printed, never the token). Beside the token, while it
runs, ``service.json`` says where its API and embedded Redis are (``aex.service_file``), so
``aex watch`` on this machine needs neither ``--url`` nor ``AEX_REDIS_URL``.

The embedded Redis keeps its data by default: an append-only file with ``appendfsync always``
in ``Settings.embedded_redis_dir()`` (AEX_REDIS_DIR, else ``~/.local/state/aex/redis``), with
the data key beside it; one ``aex serve`` at a time per folder (a lock that its redis-server
holds too). Only when asked (``--ephemeral``, AEX_REDIS_EPHEMERAL=true) does it keep nothing,
with a warning at start saying what will be lost.

The embedded Redis is supervised: when it dies it is started again on the same socket, and
the API and the workers carry on by themselves (persistent, nothing accepted is lost, and a
revoked key stays revoked; ephemeral, it starts empty: jobs accepted before answer
``job_lost``, API keys made before ``key_lost``, and a new first admin token is written).

Order of shutdown: the API stops taking requests (uvicorn), the workers get one SIGTERM
each and finish their current job, then the embedded Redis is stopped: with persistence its
append-only file stays, and a later `aex serve` on the same folder takes up the jobs still
queued and the API keys; ephemeral, it is emptied first (nothing of an upload is left
anywhere) and its temporary folder removed.
"""

from __future__ import annotations

import gc
import logging
import signal
from contextlib import contextmanager
from pathlib import Path

from aex.embedded_redis import EmbeddedRedis
from jobs.settings import Settings
from models.errors import BadParameterError, CheckpointError
from models.store.discovery import discover_checkpoints
from worker.pool import WorkerPool

log = logging.getLogger("aex.serve")


def _quiet_server(uvicorn):
    """uvicorn's Server without its own signal capture: uvicorn re-raises a captured signal
    after shutting down, which would kill this process before the workers and Redis are
    stopped. serve() installs the handlers instead. Once started, it settles the heap
    (``settle_heap``)."""

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            yield

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            settle_heap()

    return Server


# The cyclic garbage collector's first generation is collected after this many new container
# objects (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Once the API has started (its modules, routes, schemas and connections made, about
    140,000 objects that live as long as the process): move them out of the cyclic garbage
    collector's reach (``gc.freeze``) and collect the young generation less often. A classify
    request makes thousands of short-lived container objects, nearly all freed by their
    reference counts, yet with CPython's defaults the collector ran about once per five
    requests at 0.85 ms a pass, its older generations walking the start-up objects again:
    0.68 s of the API's CPU in a 32-client run of ``bench/bench_latency.py`` (about 0.17 ms
    per request of 2.3), 0.34 s frozen, 0.15 s frozen and at this threshold (timed with
    ``gc.callbacks``). Only here, in the one process ``aex serve`` runs the API in: objects
    frozen stay uncollected if they ever form garbage cycles, so a process that makes many
    apps (the tests) must not freeze each."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _already_stopping(_sig, _frame) -> None:
    log.warning("already stopping: the workers are finishing their current jobs")


def _check_store(url: str) -> None:
    """Refuse a Redis whose maxmemory-policy evicts keys (``jobs.queues.check_store_policy``)."""
    from jobs.queues import check_store_policy, connect

    conn = connect(url)
    try:
        check_store_policy(conn)
    finally:
        conn.close()


def _say_what_is_kept(settings: Settings, folder: Path | None) -> None:
    """Where the embedded Redis keeps its data, or (ephemeral) a warning of what will be lost."""
    from aex.bootstrap import say

    if folder is None:
        log.warning(
            "EPHEMERAL Redis (--ephemeral / AEX_REDIS_EPHEMERAL=true): nothing is kept on disk. When the embedded "
            "Redis restarts or aex serve stops, every job, result, API key and audit record is lost: jobs accepted "
            "before answer 410 job_lost, API keys made before answer 401 key_lost, and a new first admin token "
            "is written. Leave it out to keep them (in %s, or AEX_REDIS_DIR).",
            settings.model_copy(update={"redis_ephemeral": False}).embedded_redis_dir(),
        )
        return
    say(
        f"aex: the embedded Redis keeps jobs, results and API keys in {folder} (append-only file, written to disk "
        "before each answer) across restarts; `aex serve --ephemeral` keeps nothing."
    )


def serve(settings: Settings) -> None:
    """Run until interrupted. See the module docstring."""
    import uvicorn

    from aex.bootstrap import FirstAdmin, with_data_key
    from aex.service_file import client_url, remove_service_file, service_file, write_service_file
    from service.app import create_app
    from service.auth import check_auth_settings
    from service.server import server_options

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_auth_settings(settings)  # before anything starts (AEX_AUTH=off only on loopback)
    if settings.redis_url and settings.redis_ephemeral:
        raise BadParameterError(
            "AEX_REDIS_EPHEMERAL=true (--ephemeral) is about the embedded Redis, and AEX_REDIS_URL names a Redis "
            "of your own, whose persistence its own configuration decides: set one of them"
        )
    folder = None if settings.redis_url else settings.embedded_redis_dir()  # both ways at once are refused
    if settings.redis_url:
        settings = with_data_key(settings)  # refused without AEX_DATA_KEY, before anything starts
    if settings.workers > 0 and not discover_checkpoints(settings.checkpoint_dirs()):
        raise CheckpointError(
            "no checkpoints to serve in "
            + ", ".join(str(d) for d in settings.checkpoint_dirs())
            + ": add <name>/model.safetensors there or set AEX_MODEL_DIRS"
        )
    redis = None
    try:
        if not settings.redis_url:
            # The folder is claimed before its data key is read or made: one `aex serve` per folder.
            redis = EmbeddedRedis(folder, persistent=folder is not None)
            settings = with_data_key(settings)  # before the workers: they get it through their environment
            _say_what_is_kept(settings, folder)
            settings = settings.model_copy(update={"redis_url": redis.start()})
        _check_store(settings.redis_url)  # before any worker starts: a Redis that evicts keys is refused
    except BaseException:
        if redis is not None:
            redis.stop()
        raise
    # The workers leave a core to the API and Redis, which work while batches compute.
    pool = WorkerPool(settings, settings.workers, reserve_cores=1) if settings.workers > 0 else None
    where = None  # the service file, once written
    try:
        first_admin = FirstAdmin(settings)
        first_admin.ensure()
        if redis is not None:
            redis.on_restart = first_admin.after_restart
            redis.supervise()
        if pool is not None:
            pool.start()
        app = create_app(settings)
        log.info(
            "aex API on http://%s:%d (docs: /docs), %d worker(s), Redis %s",
            settings.host,
            settings.port,
            settings.workers,
            "embedded" if redis else settings.redis_url,
        )
        server = _quiet_server(uvicorn)(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level.lower(),
                **server_options(settings),  # AEX_MAX_CONNECTIONS, keep-alive timeout
            )
        )
        # Where this API and its embedded Redis are, for `aex watch` on this machine.
        where = write_service_file(
            service_file(first_admin.path),
            client_url(settings.host, settings.port),
            settings.redis_url if redis else None,
        )
        # Ctrl-C / SIGTERM: uvicorn stops serving (a second Ctrl-C: at once), run() returns,
        # and the clean-up below runs.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.handle_exit)
        server.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _already_stopping)
        if where is not None:
            remove_service_file(where)
        if pool is not None:
            log.info("stopping workers (each finishes its current job)")
            pool.stop()
        if redis is not None:
            redis.stop()
        log.info("stopped")
