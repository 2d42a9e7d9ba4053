"""The served models as the API knows them: published by the live workers (cached a moment),
or read from the checkpoint headers in the settings' folders while no worker has published."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from redis import Redis

from jobs.rqueue.layout import live_worker_keys, published_catalogue
from jobs.settings import Settings
from models.errors import CheckpointError, ServiceUnavailableError, UnknownModelError
from models.store.discovery import catalogue_entry, discover_checkpoints
from models.store.header import read_checkpoint_metadata

log = logging.getLogger("aex.service")


class Catalogue:
    """The served models, as the live workers published them (cached a moment); when no
    worker has published yet, read from the checkpoint headers in the settings' folders."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._at = 0.0
        self._models: dict[str, dict[str, Any]] = {}
        self._served_at: dict[str, float] = {}  # queue name -> when a live worker was last seen on it

    def served(self, conn: Redis, queue_name: str) -> bool:
        """Whether a live worker serves the queue ``queue_name``. A worker seen is believed for
        AEX_CATALOGUE_CACHE_SECONDS (a dead one's registration outlives it by AEX_WORKER_TTL
        anyway); none seen is looked up again at every call, so a worker that starts is used
        at once."""
        seen = self._served_at.get(queue_name)
        if seen is not None and time.monotonic() - seen <= self.settings.catalogue_cache_seconds:
            return True
        if not live_worker_keys(conn, queue_name):
            return False
        self._served_at[queue_name] = time.monotonic()
        return True

    def models(self, conn: Redis) -> dict[str, dict[str, Any]]:
        # Read outside the lock: a Redis call inside run_green waits on the loop, where a
        # request of the same thread taking the lock would deadlock (``service.green``). Two
        # requests may then read it at once; both store what they read.
        with self._lock:
            if time.monotonic() - self._at <= self.settings.catalogue_cache_seconds and self._models:
                return self._models
        models = published_catalogue(conn) or self._from_files()
        with self._lock:
            self._models, self._at = models, time.monotonic()
        return models

    def _from_files(self) -> dict[str, dict[str, Any]]:
        out = {}
        try:
            paths = discover_checkpoints(self.settings.checkpoint_dirs())
        except CheckpointError as exc:
            log.error("cannot list checkpoints: %s", exc.message)
            return {}
        for name, path in paths.items():
            try:
                out[name] = {**catalogue_entry(name, path, read_checkpoint_metadata(path)), "workers": 0}
            except CheckpointError as exc:
                log.error("skipping %s in the model list: %s", path, exc.message)
        return out

    def resolve(self, conn: Redis, name: str | None) -> dict[str, Any]:
        """The entry of model ``name`` (None: AEX_DEFAULT_MODEL, else the first by name)."""
        models = self.models(conn)
        if not models:
            raise ServiceUnavailableError(
                "no models are served (no worker has published any and no checkpoint was found)"
            )
        name = name or self.settings.default_model or sorted(models)[0]
        if name not in models:
            raise UnknownModelError(f"unknown model {name!r}; served: {', '.join(sorted(models))}")
        return models[name]
