"""The token the CLI and the client send: given, from AEX_TOKEN, or read from the token file (AEX_TOKEN_FILE, default ~/.config/aex/token, mode 0600).

``aex serve`` writes its first admin token there (``write_token``); the client reads it when
no token is given (``resolve_token``). A token file that others may read is refused, as ssh
refuses such a key. Torch-free.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from models.errors import BadParameterError


def default_token_file(env: Mapping[str, str] | None = None) -> Path:
    """``$AEX_TOKEN_FILE``, else ``$XDG_CONFIG_HOME/aex/token``, else ``~/.config/aex/token``."""
    env = os.environ if env is None else env
    if env.get("AEX_TOKEN_FILE"):
        return Path(env["AEX_TOKEN_FILE"]).expanduser()
    config = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "aex" / "token"


def read_token(path: str | Path) -> str | None:
    """The token in ``path`` (its first line), or None when there is no such file.
    BadParameterError when the file is readable by others than its owner."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BadParameterError(f"the token file {path} is readable by others: run `chmod 600 {path}`")
    text = path.read_text(encoding="utf-8").strip()
    return text.splitlines()[0].strip() if text else None


def write_token(path: str | Path, token: str) -> Path:
    """Write ``token`` to ``path`` with mode 0600 (its folder 0700 when created), replacing
    the file atomically. Returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".token-")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(token + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_token(token: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The token to send: ``token`` when given, else $AEX_TOKEN, else the token file's; None
    when there is none (the service then answers 401 unless its auth is off)."""
    env = os.environ if env is None else env
    if token:
        return token.strip()
    if env.get("AEX_TOKEN", "").strip():
        return env["AEX_TOKEN"].strip()
    return read_token(default_token_file(env))
