"""What `aex serve` sets up before it serves: the data key (AEX_DATA_KEY) and the first admin token.

The data key: given (AEX_DATA_KEY) it is used as it is. Without it, the embedded Redis gets the
one kept in ``data.key`` (mode 0600, created on the first run) in the folder of its data
(``Settings.embedded_redis_dir``: AEX_REDIS_DIR or the per-user state folder), so what the
persistent Redis holds stays readable; an ephemeral one (AEX_REDIS_EPHEMERAL) gets a new key
each run (its data dies with it anyway). An external Redis without AEX_DATA_KEY is refused:
the API and every worker must share one key, which only the operator can hand them.

The first admin: when the service's Redis holds no API key, an ``admin`` key with every scope
is created and its token written to AEX_TOKEN_FILE (default ``~/.config/aex/token``, mode 0600);
the path is printed, never the token, with how to use it. A token is never made twice: when the
embedded Redis restarts having lost its data (ephemeral), a NEW admin token is made and written
to the file, with a warning; the earlier one, which may have been revoked, answers ``key_lost``
like every other key of the lost data. With persistence a restart loses nothing (a revoked key
stays revoked in the append-only file) and no key is made. Torch-free.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

from pydantic import SecretStr

from aex.credentials import default_token_file, write_token
from jobs.crypto import generate_data_key, parse_data_key
from jobs.epoch import store_epoch
from jobs.queues import connect
from jobs.settings import Settings
from models.errors import BadParameterError
from service.auth.apikeys import ApiKeyStore

log = logging.getLogger("aex.serve")

DATA_KEY_FILE = "data.key"


def say(text: str) -> None:
    """A line for whoever started `aex serve` (stderr, whatever the log level)."""
    print(text, file=sys.stderr, flush=True)


def _read_key_file(path: Path) -> str:
    info = path.stat()
    if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BadParameterError(f"the data key file {path} is readable by others: run `chmod 600 {path}`")
    text = path.read_text(encoding="ascii").strip()
    parse_data_key(text)  # a malformed file is refused here, not at the first upload
    return text


def _create_key_file(path: Path) -> str:
    key = generate_data_key()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(key + "\n")
    return key


def with_data_key(settings: Settings) -> Settings:
    """``settings`` with a data key (see the module docstring), before Redis, the workers or
    the API start: the workers get it through ``Settings.as_env``."""
    if settings.data_key is not None:
        return settings
    if settings.redis_url:
        raise BadParameterError(
            "AEX_DATA_KEY is not set, and AEX_REDIS_URL names a Redis of your own: uploads and outputs are "
            "encrypted at rest with a key the API and every worker share. Run `aex data-key`, keep its output "
            "secret, and give it to the API and every worker as AEX_DATA_KEY"
        )
    folder = settings.embedded_redis_dir()
    if folder is None:
        key = generate_data_key()  # the ephemeral Redis keeps nothing across runs: neither does its key
    else:
        path = folder / DATA_KEY_FILE
        try:
            key = _read_key_file(path)
        except FileNotFoundError:
            key = _create_key_file(path)
            log.info("new data key for the persistent Redis in %s", path)
    return settings.model_copy(update={"data_key": SecretStr(key)})


class FirstAdmin:
    """The first admin key of the service's Redis and its token file."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.path = Path(settings.token_file).expanduser() if settings.token_file else default_token_file()
        self.epoch: str | None = None  # the store epoch at start: another one means the data was lost

    def _ensure(self, epoch: str | None = None) -> tuple[str | None, str]:
        """(the new admin token, or None when keys exist; the store's epoch). With ``epoch``:
        no key is made unless the store's epoch differs from it."""
        conn = connect(self.settings.redis_url)
        try:
            now = store_epoch(conn)
            if epoch is not None and now == epoch:
                return None, now
            return ApiKeyStore(conn).ensure_first_admin(), now
        finally:
            conn.close()

    def ensure(self) -> None:
        """Create the first admin when no key exists, write its token and say where it is."""
        if self.settings.auth != "on":
            return
        token, self.epoch = self._ensure()
        if token is None:
            say(
                f"aex: this Redis holds API keys already: use yours (an earlier `aex serve` wrote its admin token to "
                f"{self.path}); `aex keys create NAME --scopes submit,read` makes more with an admin token."
            )
            return
        write_token(self.path, token)
        url = f"http://{self.settings.host}:{self.settings.port}"
        say(
            f"aex: authentication is on. The first admin token is in {self.path} (mode 0600; never printed).\n"
            f"aex:   the aex command line and Python client read it from there by themselves;\n"
            f"aex:   the viewer at {url}/ : paste the file's content into its 'Access token' field;\n"
            f'aex:   curl: -H "Authorization: Bearer $(cat {self.path})";\n'
            f"aex:   more keys, e.g. read-only: aex keys create NAME --scopes read"
        )

    def after_restart(self) -> None:
        """After the embedded Redis restarted: when it lost its data (its epoch changed), a NEW
        first admin token written to the file, with a warning; never an earlier token (it may
        have been revoked). With persistence (the same epoch) nothing is made."""
        if self.settings.auth != "on":
            return
        token, epoch = self._ensure(self.epoch)
        if epoch == self.epoch:
            return
        self.epoch = epoch
        if token is not None:
            write_token(self.path, token)
        log.warning(
            "the embedded Redis restarted without its data: every API key made before is lost (answered 401 "
            "key_lost) and every job (410 job_lost); %s",
            f"a NEW first admin token is in {self.path}" if token is not None else "API keys exist already",
        )
