"""Import the paper's released CIFAR-10 networks (legacy ``torch.save`` pickles) safely.

The files hold ``{'model_params': state_dict, 'training_options': {...}}`` where
``training_options['arch']`` contains a function pickled as ``__main__.cifar10_preprocess``.
They are read with torch's restricted unpickler (``weights_only=True``), which only builds
tensors and plain containers; the one function reference is mapped to a harmless stand-in
that is never called. Any other global (``os.system``, ...) is refused before anything runs
and reported as ``UnsafeCheckpointError`` naming the global.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.data.datasets import CIFAR10_CLASSES
from models.data.sources import file_sha256
from models.defaults import K_PSI, PSI0
from models.errors import CheckpointError, UnsafeCheckpointError
from models.nn.registry import create_model
from models.store.checkpoint import CheckpointMeta, save_checkpoint

REFERENCE_FUNCTION = "__main__.cifar10_preprocess"
REFERENCE_SOURCE = "wwoods/adversarial-explanations-cifar"


def _reference_preprocess_stand_in(*_args: Any, **_kwargs: Any) -> None:
    """Stands in for the pickled ``__main__.cifar10_preprocess``; never meant to be called."""
    raise CheckpointError("the reference checkpoint's preprocessing function is a stand-in and cannot be called")


@dataclass
class ReferenceNetwork:
    """A loaded reference file: the rebuilt model (CPU, eval) and what we know about it."""

    model: nn.Module
    state_dict: dict[str, torch.Tensor]
    training_options: dict[str, Any]
    meta: CheckpointMeta


def _refused_global(message: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else None


def load_reference_file(path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle a reference file with the restricted unpickler; returns the raw dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"reference checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([(_reference_preprocess_stand_in, REFERENCE_FUNCTION)]):
            data = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        name = _refused_global(str(exc))
        if name:
            raise UnsafeCheckpointError(
                f"{path}: refused to load; the file asks for the Python global {name!r}, which could "
                f"run code. Only tensors, plain containers and {REFERENCE_FUNCTION} are allowed."
            ) from None
        raise UnsafeCheckpointError(
            f"{path}: refused to load; it uses pickle features the safe loader does not allow "
            f"({str(exc).splitlines()[-1] if str(exc) else type(exc).__name__})"
        ) from None
    except Exception as exc:  # a garbled file fails in many ways (IndexError, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not {"model_params", "training_options"} <= set(data):
        raise CheckpointError(
            f"{path}: not a reference checkpoint (expected a dict with model_params and training_options)"
        )
    return data


def _json_safe(value: Any) -> Any:
    """Plain JSON types only; callables become their reference name."""
    if callable(value) and not isinstance(value, (torch.Tensor, type)):
        return REFERENCE_FUNCTION if value is _reference_preprocess_stand_in else repr(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def _architecture(options: dict[str, Any], state: dict[str, torch.Tensor], path: Path):
    """(registry name, arch args, num_classes, input_size) from training_options['arch']."""
    try:
        input_size, _fn, block_lens, block_fts, num_classes = options["arch"]
        input_size, num_classes = int(input_size), int(num_classes)
        block_lens, block_fts = [int(b) for b in block_lens], [int(f) for f in block_fts]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: training_options['arch'] is not [size, fn, blocks, widths, classes]") from None
    w = block_fts[0]
    if len(block_lens) != 3 or len(set(block_lens)) != 1 or block_fts != [w, 2 * w, 4 * w]:
        raise CheckpointError(f"{path}: unsupported reference architecture {block_lens} x {block_fts}")
    depth = 6 * block_lens[0] + 2
    offset = state.get("input_offset")
    if offset is None or tuple(offset.shape) != (2, 3):
        raise CheckpointError(f"{path}: state dict lacks an input_offset of shape (2, 3)")
    args: dict[str, Any] = {
        "activation": "hhrelu" if options.get("robust_additions") else "relu",
        "mean": [float(v) for v in offset[0]],
        "std": [float(v) for v in offset[1]],
    }
    name = f"resnet{depth}_cifar"
    if not (w == 16 and num_classes == 10 and input_size == 32 and depth in (20, 32, 44, 56)):
        name = "preact_resnet"
        args.update(depth=depth, width=w, in_channels=3, num_classes=num_classes, input_size=input_size)
    return name, args, num_classes, input_size


def load_reference(path: str | os.PathLike) -> ReferenceNetwork:
    """Load a reference file into our PreActResNet (strict keys) with checkpoint metadata."""
    path = Path(path)
    data = load_reference_file(path)
    state, options = data["model_params"], data["training_options"]
    if not isinstance(state, dict) or not isinstance(options, dict):
        raise CheckpointError(f"{path}: model_params and training_options must be dicts")
    state = {str(k): v for k, v in state.items()}
    arch, args, num_classes, input_size = _architecture(options, state, path)
    model = create_model(arch, **args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {arch}: {exc}") from None
    model.eval()

    recipe = _json_safe({k: v for k, v in options.items() if k != "arch"})
    recipe["arch"] = {
        "input_size": input_size,
        "preprocess": REFERENCE_FUNCTION,
        "block_lens": [int(b) for b in options["arch"][2]],
        "block_features": [int(f) for f in options["arch"][3]],
        "num_classes": num_classes,
    }
    recipe["source"] = REFERENCE_SOURCE
    psi_state = None
    if options.get("robust_integration") is not None:
        s = float(options["robust_integration"])
        psi_state = {"S": s, "psi": PSI0 * math.exp(K_PSI * s), "psi0": PSI0, "k_psi": K_PSI}
    meta = CheckpointMeta(
        arch=arch,
        arch_args=args,
        classes=CIFAR10_CLASSES if num_classes == 10 else [str(i) for i in range(num_classes)],
        input_size=input_size,
        in_channels=3,
        mean=args["mean"],
        std=args["std"],
        recipe=recipe,
        psi_state=psi_state,
        extra={"source_file": path.name, "source_sha256": file_sha256(path)},
    )
    return ReferenceNetwork(model=model, state_dict=state, training_options=options, meta=meta)


def import_reference(src: str | os.PathLike, dst: str | os.PathLike) -> CheckpointMeta:
    """Convert a reference file into one of our safetensors checkpoints; returns its metadata."""
    ref = load_reference(src)
    return save_checkpoint(dst, ref.model, ref.meta)
