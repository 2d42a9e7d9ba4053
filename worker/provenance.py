"""Provenance of a result: which model, which file, which parameters, which input, which
software, on which device, how long each part took. Every classify and explain result
carries it under "provenance" (``jobs.results.Provenance``), so a reviewer can tell exactly how a figure came about and
reproduce it."""

from __future__ import annotations

import hashlib
import platform
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from typing import Any

import torch

from jobs.params import JobParameters
from models.store.discovery import headline_metrics
from models.version import __version__
from worker.served import ServedModel

PACKAGES = ("torch", "torchvision", "numpy", "pillow", "pydicom", "highdicom", "safetensors", "rq", "redis")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=1)
def software_versions() -> dict[str, str | None]:
    """Versions of aex, Python and the packages a result depends on (None: not installed)."""
    out: dict[str, str | None] = {"aex": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return out


@lru_cache(maxsize=8)
def device_description(device: torch.device) -> dict[str, Any]:
    """{"type", "name", "torch_threads"}: the device a worker computes on."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
    else:
        name = platform.processor() or platform.machine()
    return {"type": device.type, "index": device.index, "name": name, "torch_threads": torch.get_num_threads()}


def determinism() -> dict[str, Any]:
    """What torch was asked for: results are bit-identical on the same device type and
    thread count; across CPU and CUDA (or different GPUs) they agree only to rounding."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


def build_provenance(
    served: ServedModel,
    *,
    kind: str,
    parameters: JobParameters,
    method: dict[str, Any],
    input_sha256: str,
    input_info: dict[str, Any],
    cache_key: str,
    timings: dict[str, float],
    worker: str | None,
) -> dict[str, Any]:
    """The "provenance" block of a result, as JSON values: validated (``jobs.results.Provenance``)
    with the result it is part of, once.

    parameters: the request's canonical parameters (the cache key's); method: every setting
    the computation used, defaults included (search settings, layer, clamping, ...)."""
    return {
        "kind": kind,
        "model": served.name,
        "checkpoint_file": served.path.name,
        "checkpoint_sha256": served.checkpoint_sha256,
        "weights_sha256": served.meta.weights_sha256,
        "checkpoint_metrics": headline_metrics(served.meta.metrics),
        "architecture": {
            "arch": served.meta.arch,
            "input_size": served.meta.input_size,
            "in_channels": served.meta.in_channels,
            "num_classes": len(served.meta.classes),
        },
        "parameters": parameters.kwargs(),
        "method": method,
        "input_sha256": input_sha256,
        "input": input_info,
        "software": software_versions(),
        "device": device_description(served.device),
        "determinism": determinism(),
        "timings": {k: round(float(v), 6) for k, v in timings.items()},
        "cache_key": cache_key,
        "computed_at": datetime.now(UTC).isoformat(),
        "worker": worker,
    }
