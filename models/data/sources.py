"""How a data set or file is named in records that leave this machine (checkpoint metadata,
recorded figures): the path as typed when it is relative and stays inside the working
directory, else its last component, with the sha256 of its bytes. Torch-free."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as a checkpoint records it: as typed when it is relative and does not climb
    out of the working directory (``data/x.npz``), else its last component (``x.npz`` for
    ``/srv/data/x.npz``, ``../shared/x.npz`` or ``~/x.npz``)."""
    s = os.fspath(path)
    if not os.path.isabs(s) and not s.startswith("~"):
        norm = os.path.normpath(s)
        if norm != os.pardir and not norm.startswith(os.pardir + os.sep):
            return s
    return Path(os.path.abspath(os.path.expanduser(s))).name or "."


def data_reference(path: str | os.PathLike) -> dict[str, str]:
    """How a checkpoint records the data set at ``path``.

    ``{"path": p}`` when ``portable_path`` keeps it as typed, else ``{"name": n}``; plus
    ``sha256`` of the file for a file (``.npz``, tar), or for a folder ``listing_sha256``:
    a digest of its sorted relative file paths and sizes (cheap and stable, but blind to
    contents that change without changing size). Nothing more for a path that does not
    exist."""
    s = os.fspath(path)
    shown = portable_path(s)
    ref = {"path": shown} if shown == s else {"name": shown}
    ref.update(data_digest(s))
    return ref


def data_digest(path: str | os.PathLike) -> dict[str, str]:
    """``{"sha256": ...}`` of a file, ``{"listing_sha256": ...}`` of a folder (see
    ``data_reference``), ``{}`` where nothing is there."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_file():
        return {"sha256": file_sha256(p)}
    if p.is_dir():
        h = hashlib.sha256()
        for line in sorted(
            f"{(Path(d) / n).relative_to(p).as_posix()}\t{(Path(d) / n).stat().st_size}\n"
            for d, _, names in os.walk(p)
            for n in names
            if (Path(d) / n).is_file()
        ):
            h.update(line.encode())
        return {"listing_sha256": h.hexdigest()}
    return {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces (checkpoints, reference files, data
    sets), computed once per (path, size, mtime) in a process."""
    p = Path(path).resolve()
    st = p.stat()
    return _file_sha256(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per (path, size, mtime) in a process (a run hashes its data
    when it starts, and again on resume checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def portable_source(source: str, file: str) -> str:
    """A split's description (``<file>:test``, ``<file>[seeded 1000 of 10000]``) with its
    ``file`` recorded as ``portable_path`` does."""
    if file and source.startswith(file):
        return portable_path(file) + source[len(file) :]
    return portable_path(source) if os.path.isabs(source) or source.startswith("~") else source
