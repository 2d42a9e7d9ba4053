"""Find served checkpoints in folders and read what they say about themselves, without torch.

The API process must never import torch, but it may need a checkpoint's metadata (when no
worker has published its catalogue yet). A safetensors file starts with an 8-byte
little-endian header length and a JSON header whose ``__metadata__.aex`` holds the
checkpoint's metadata (see ``models.checkpoint``), so plain ``json`` reads it.

Layouts found in a folder D (a file named ``*.resume.safetensors`` is trainer state and
never served):

- ``D/<name>/model.safetensors`` (the bundled layout, ``models/checkpoints/<name>/``);
- ``D/<name>/<name>.safetensors`` (a run folder written by ``aex train``);
- ``D/<name>.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aex.errors import CheckpointError

CHECKPOINT_FILE = "model.safetensors"
RESUME_SUFFIX = ".resume.safetensors"
META_KEY = "aex"  # the same key models.checkpoint writes
MAX_HEADER_BYTES = 100_000_000


def _servable(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors" and not path.name.endswith(RESUME_SUFFIX)


def discover_checkpoints(dirs: Iterable[Path]) -> dict[str, Path]:
    """Served name -> checkpoint path over ``dirs`` in order. Folders that do not exist are
    skipped; the same name in two places is an error (which one would a client get?)."""
    found: dict[str, Path] = {}
    for folder in dirs:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        candidates: list[tuple[str, Path]] = []
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                for inner in (entry / CHECKPOINT_FILE, entry / f"{entry.name}.safetensors"):
                    if _servable(inner):
                        candidates.append((entry.name, inner))
                        break
            elif _servable(entry):
                candidates.append((entry.name[: -len(".safetensors")], entry))
        for name, path in candidates:
            if name in found:
                raise CheckpointError(f"two checkpoints are served as {name!r}: {found[name]} and {path}; rename one")
            found[name] = path
    return found


def _describe_bad_file(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return "it is a zip archive (a torch.save file?), not safetensors"
    if head[:1] == b"\x80":
        return ("it is a Python pickle (a legacy torch.save file?), which is never unpickled; "
                "use `aex import-reference` for the paper's networks")
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


def public_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's metrics without the per-image ARA radii arrays (``ara_radii`` keeps its
    n, seed, data and settings): what the model list and result provenance show."""
    out = dict(metrics or {})
    radii = out.get("ara_radii")
    if isinstance(radii, dict):
        out["ara_radii"] = {k: v for k, v in radii.items() if k not in ("attack", "btr")}
    return out


def catalogue_entry(name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The public description of one served checkpoint (GET /v1/models), JSON-safe."""
    return {
        "name": name,
        "file": path.name,
        "arch": meta.get("arch"),
        "arch_args": meta.get("arch_args", {}),
        "classes": list(meta.get("classes", [])),
        "num_classes": len(meta.get("classes", [])),
        "input_size": meta.get("input_size"),
        "in_channels": meta.get("in_channels"),
        "metrics": public_metrics(meta.get("metrics", {})),
        "recipe": meta.get("recipe", {}),
        "weights_sha256": meta.get("weights_sha256", ""),
    }
