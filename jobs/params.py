"""The canonical parameters of a job and the key of its result.

A job's parameters are built once, by the API (and by ``aex explain --checkpoint``), with
these functions; the worker gets them as its keyword arguments, records them in the result's
provenance and keys the result on them. Same input bytes + same checkpoint file + same
parameters (+ same aex version) = same result, which is then served again instead of being
recomputed."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from models.errors import BadParameterError
from models.explain.targets import split_specs

STABILITY_MODES = ("fast", "exact")


def _mode(stability_mode: str) -> str:
    if stability_mode not in STABILITY_MODES:
        raise BadParameterError(f"stability_mode must be one of {', '.join(STABILITY_MODES)}, got {stability_mode!r}")
    return stability_mode


def _window(window_center: float | None, window_width: float | None) -> list[float] | None:
    return None if window_center is None else [float(window_center), float(window_width)]


def classify_parameters(
    top_k: int,
    stability: bool,
    stability_steps: int,
    window_center: float | None = None,
    window_width: float | None = None,
    stability_mode: str = "fast",
) -> dict[str, Any]:
    """The canonical parameters of a classify job (stability_steps and stability_mode only
    with stability)."""
    return {
        "top_k": int(top_k),
        "stability": bool(stability),
        "stability_steps": int(stability_steps) if stability else None,
        "stability_mode": _mode(stability_mode) if stability else None,
        "window": _window(window_center, window_width),
    }


def explain_parameters(
    targets: list[str],
    rho: float,
    steps: int,
    layer: str | None,
    stability_steps: int,
    window_center: float | None = None,
    window_width: float | None = None,
    stability_mode: str = "fast",
) -> dict[str, Any]:
    """The canonical parameters of an explain job; ``layer`` is the resolved layer name."""
    return {
        "targets": [str(t) for t in split_specs(targets)],
        "rho": float(rho),
        "steps": int(steps),
        "layer": layer,
        "stability_steps": int(stability_steps),
        "stability_mode": _mode(stability_mode),
        "window": _window(window_center, window_width),
    }


def result_cache_key(
    kind: str, model: str, checkpoint_sha256: str, input_sha256: str, parameters: dict[str, Any], version: str
) -> str:
    """sha256 of everything a result depends on, as canonical JSON."""
    material = {
        "kind": kind,
        "model": model,
        "checkpoint_sha256": checkpoint_sha256,
        "input_sha256": input_sha256,
        "parameters": parameters,
        "aex": version,
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()
