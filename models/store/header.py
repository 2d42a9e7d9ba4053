"""Read what a checkpoint says about itself from its safetensors header, without torch.

The API process must never import torch, but it may need a checkpoint's metadata (when no
worker has published its catalogue yet). A safetensors file starts with an 8-byte
little-endian header length and a JSON header whose ``__metadata__.aex`` holds the
checkpoint's metadata (see ``models.store.checkpoint``), so plain ``json`` reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.errors import CheckpointError

META_KEY = "aex"  # the same key models.store.checkpoint writes


MAX_HEADER_BYTES = 100_000_000


def _describe_bad_file(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return "it is a zip archive (a torch.save file?), not safetensors"
    if head[:1] == b"\x80":
        return (
            "it is a Python pickle (a legacy torch.save file?), which is never unpickled; "
            "use `aex import-reference` for the paper's networks"
        )
    return "it is not a valid safetensors file (truncated or corrupt?)"


def read_aex_metadata(path: str | Path) -> dict[str, Any]:
    """The raw aex metadata dictionary from a safetensors header, read as plain JSON (no
    torch, no tensor data touched). Raises CheckpointError naming what the file is instead."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: file is too short to be a checkpoint ({size} bytes)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: {_describe_bad_file(path)}")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: {_describe_bad_file(path)}") from None
    raw_meta = (header.get("__metadata__") or {}).get(META_KEY) if isinstance(header, dict) else None
    if raw_meta is None:
        raise CheckpointError(f"{path}: safetensors file has no aex metadata (not an aex checkpoint)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: aex metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: aex metadata is not a JSON object")
    return meta


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The aex metadata dictionary of a checkpoint (arch, classes, input_size, metrics, ...),
    read from the safetensors header only. Raises CheckpointError for anything else."""
    meta = read_aex_metadata(path)
    if not isinstance(meta.get("classes"), list):
        raise CheckpointError(f"{path}: aex metadata lacks the class names")
    return meta
