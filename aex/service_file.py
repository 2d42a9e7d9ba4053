"""Where a running ``aex serve`` is: its API's URL and its embedded Redis, in a file beside the token file (``service.json``, mode 0600), removed when it stops; ``aex watch`` reads it when given no URL.

``aex serve`` starts its embedded Redis on a new private Unix socket at each start, and a
log line was the only place that said which; the watcher keeps its state in that Redis and
submits to that API. So ``aex serve`` writes ``{"url", "redis_url", "pid"}`` next to the
token it writes (``$AEX_TOKEN_FILE``'s folder, by default ``~/.config/aex/``): ``url`` is the
API as a client on this machine reaches it (127.0.0.1 for a server on every address),
``redis_url`` the embedded Redis's socket (left out with a Redis of your own, whose URL may
hold a password: the watcher then takes ``AEX_REDIS_URL`` as before). The file is written
atomically, 0600 like the token (the socket it names is its owner's only), and removed when
``aex serve`` stops, if it is still its own. A file whose ``aex serve`` is gone (killed) is
refused, saying so. Torch-free.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aex.credentials import default_token_file, read_token
from models.errors import BadParameterError

NAME = "service.json"


@dataclass(frozen=True)
class RunningService:
    """What a running ``aex serve`` wrote: its API's URL, its embedded Redis (or None) and its pid."""

    url: str
    redis_url: str | None
    pid: int


def service_file(token_file: Path | None = None) -> Path:
    """The file beside ``token_file`` (default: ``credentials.default_token_file()``)."""
    return (token_file or default_token_file()).expanduser().parent / NAME


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches a server bound to ``host``:``port`` by."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_service_file(path: Path, url: str, redis_url: str | None) -> Path:
    """Write what this process serves to ``path`` (mode 0600, its folder 0700 when created),
    atomically. Returns the path."""
    doc = {"url": url, "pid": os.getpid(), **({"redis_url": redis_url} if redis_url else {})}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".service-")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(doc, out)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_service_file(path: Path) -> None:
    """Remove ``path`` when this process wrote it (another ``aex serve`` may have since)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def running_service(path: Path | None = None) -> RunningService:
    """The ``aex serve`` that wrote ``path`` (default: ``service_file()``); BadParameterError
    saying what to do when there is none, its ``aex serve`` is gone, or others may read it."""
    path = path or service_file()
    read_token(path)  # the same rule as the token file: refused when others may read it
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        found = RunningService(str(doc["url"]), doc.get("redis_url"), int(doc["pid"]))
    except FileNotFoundError:
        raise BadParameterError(
            f"no --url given and no running `aex serve` found ({path} does not exist): give --url, or start "
            "`aex serve` as this user (with the same AEX_TOKEN_FILE)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError):
        raise BadParameterError(f"{path} is not what `aex serve` writes: give --url") from None
    if not _alive(found.pid):
        raise BadParameterError(
            f"the `aex serve` (pid {found.pid}) that wrote {path} is not running: start it, or give --url"
        )
    return found
