"""What `aex serve` sets up before it serves: the data key (AEX_DATA_KEY) and the first admin token.

The data key: given (AEX_DATA_KEY) it is used as it is. Without it, the embedded Redis gets one:
a new one each run without AEX_REDIS_DIR (the data dies with the Redis anyway), or the one kept
in ``<AEX_REDIS_DIR>/data.key`` (mode 0600, created on the first run) with it, so what the
persistent Redis holds stays readable. An external Redis without AEX_DATA_KEY is refused: the
API and every worker must share one key, which only the operator can hand them.

The first admin: when the service's Redis holds no API key, an ``admin`` key with every scope
is created and its token written to AEX_TOKEN_FILE (default ``~/.config/aex/token``, mode 0600);
the path is printed, never the token, with how to use it. When the embedded Redis restarts
empty, the same token is restored, so the file and a pasted token keep working. Torch-free.
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
    if settings.redis_dir is None:
        key = generate_data_key()  # the embedded Redis keeps nothing across runs: neither does its key
    else:
        path = Path(settings.redis_dir) / DATA_KEY_FILE
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
        self.token: str | None = None  # the token this process created (restored after a Redis restart)

    def _ensure(self) -> str | None:
        conn = connect(self.settings.redis_url)
        try:
            return ApiKeyStore(conn).ensure_first_admin(token=self.token)
        finally:
            conn.close()

    def ensure(self) -> None:
        """Create the first admin when no key exists, write its token and say where it is."""
        if self.settings.auth != "on":
            return
        token = self._ensure()
        if token is None:
            say(
                f"aex: this Redis holds API keys already: use yours (an earlier `aex serve` wrote its admin token to "
                f"{self.path}); `aex keys create NAME --scopes submit,read` makes more with an admin token."
            )
            return
        self.token = token
        write_token(self.path, token)
        url = f"http://{self.settings.host}:{self.settings.port}"
        say(
            f"aex: authentication is on. The first admin token is in {self.path} (mode 0600; never printed).\n"
            f"aex:   the aex command line and Python client read it from there by themselves;\n"
            f"aex:   the viewer at {url}/ : paste the file's content into its 'Access token' field;\n"
            f'aex:   curl: -H "Authorization: Bearer $(cat {self.path})";\n'
            f"aex:   more keys, e.g. read-only: aex keys create NAME --scopes read"
        )

    def restore(self) -> None:
        """After the embedded Redis restarted empty: the same admin key again (the token file
        stays right), or a new one written to the file when this process had none."""
        if self.settings.auth != "on":
            return
        had = self.token
        token = self._ensure()
        if token is None:
            return
        if token != had:
            self.token = token
            write_token(self.path, token)
        log.warning(
            "the embedded Redis restarted empty: the first admin key is back (token in %s); other API keys are gone",
            self.path,
        )
