"""Find served checkpoints in folders and describe them for the model list, without torch.

Layouts found in a folder D (a file named ``*.resume.safetensors`` is trainer state and
never served):

- ``D/<name>/model.safetensors`` (the bundled layout, ``models/checkpoints/<name>/``);
- ``D/<name>/<name>.safetensors`` (a run folder written by ``aex train``);
- ``D/<name>.safetensors``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from models.errors import CheckpointError

CHECKPOINT_FILE = "model.safetensors"


RESUME_SUFFIX = ".resume.safetensors"


def _servable(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors" and not path.name.endswith(RESUME_SUFFIX)


def served_name(path: str | Path) -> str:
    """The name a checkpoint file is served under (the layouts above): its folder's name for
    ``<name>/model.safetensors`` and ``<name>/<name>.safetensors``, else the file's stem."""
    path = Path(path)
    if path.name == CHECKPOINT_FILE or path.stem == path.parent.name:
        return path.parent.name
    return path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem


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


def public_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's metrics without the per-image radii arrays (``ara_radii``, the exact
    search's, and ``fast_radii``, the fast stability search's, keep their n, seed, data,
    settings and agreement figures): what the model list and result provenance show."""
    out = dict(metrics or {})
    for key in ("ara_radii", "fast_radii"):
        radii = out.get(key)
        if isinstance(radii, dict):
            out[key] = {k: v for k, v in radii.items() if k not in ("attack", "btr")}
    return out


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's scalar metrics (accuracies, ARA, AutoAttack, sanity and faithfulness
    figures, n, seeds, sources): what every result's provenance carries. The nested records
    (curves, settings, per-class accuracy, radii summaries) stay in the model list
    (``public_metrics``, GET /v1/models/{name}) and the model card, for the same
    ``checkpoint_sha256``: repeated in each result they were three quarters of a classify
    result's JSON (6.2 of 8.5 KB), paid by the worker, Redis, the API and the client."""
    return {k: v for k, v in public_metrics(metrics).items() if v is None or isinstance(v, (bool, int, float, str))}


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
