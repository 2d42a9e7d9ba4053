"""Self-describing checkpoints: safetensors weights plus JSON metadata in the header.

One file, ``*.safetensors``. The header's ``__metadata__`` holds a single key ``aex`` with a
JSON document: architecture name and arguments, class names, input size and channels,
mean/std, the training recipe, the adaptive-psi state, evaluation metrics (with n and seed)
the sha256 of the weights, and what standard concept each class is (``class_codes``: class
-> {scheme, value, meaning}, see ``models.dicom.class_codes``; absent in older checkpoints,
which load as before). Loading never unpickles anything: safetensors is a JSON
header plus raw tensor bytes. Writes go to a temporary file in the same folder, then
``os.replace`` (atomic on POSIX), so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.dicom.class_codes import stored_codes
from models.errors import BadParameterError, CheckpointError
from models.nn.registry import create_model
from models.store.header import META_KEY, read_aex_metadata

FORMAT_VERSION = 1
MODEL_PREFIX = "model."
REQUIRED = ("arch", "arch_args", "classes", "input_size", "in_channels", "mean", "std")


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself."""

    arch: str
    arch_args: dict[str, Any]
    classes: list[str]
    input_size: int
    in_channels: int
    mean: list[float]
    std: list[float]
    recipe: dict[str, Any] = field(default_factory=dict)
    psi_state: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # class -> {scheme, value, meaning}: the standard concept of each class that has one
    class_codes: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointMeta:
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise CheckpointError(f"checkpoint metadata lacks {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        meta = cls(**{k: v for k, v in d.items() if k in known})
        try:
            stored_codes(meta.class_codes or {}, meta.classes)
        except BadParameterError as exc:
            raise CheckpointError(f"checkpoint metadata: {exc.message}") from None
        return meta


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor in sorted key order: name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); a checkpoint gets the usual mode for a new
        # file (0666 less the umask), so workers running as another user can read it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    meta: CheckpointMeta,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> CheckpointMeta:
    """Write ``model``'s state dict (keys prefixed ``model.``) and ``meta`` atomically.

    ``extra_tensors`` (for example optimiser state for resuming) are stored under their own
    names, which must not start with ``model.``. Returns the metadata with its sha256 filled.
    """
    model_tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta.weights_sha256 = weights_sha256(model_tensors)
    tensors = {MODEL_PREFIX + k: v for k, v in model_tensors.items()}
    for k, v in (extra_tensors or {}).items():
        if k.startswith(MODEL_PREFIX):
            raise ValueError(f"extra tensor name {k!r} may not start with {MODEL_PREFIX!r}")
        tensors[k] = v.detach().cpu().contiguous()
    _atomic_save(tensors, {META_KEY: meta.to_json()}, Path(path))
    return meta


def read_metadata(path: str | os.PathLike) -> CheckpointMeta:
    """Read only the metadata (cheap: no tensor data is touched)."""
    return CheckpointMeta.from_dict(read_aex_metadata(path))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors in the file (model and extra), on CPU, without unpickling."""
    path = Path(path)
    read_metadata(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({exc}); the file may be truncated") from None


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the network from metadata and load its weights with strict key checks.

    Returns ``(model in eval mode on device, meta)``. Raises ``CheckpointError`` for a
    missing, truncated, pickled or metadata-less file, a key mismatch, or (with ``verify``)
    weights whose sha256 differs from the recorded one.
    """
    meta = read_metadata(path)
    tensors = load_tensors(path)
    state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    if verify and meta.weights_sha256 and weights_sha256(state) != meta.weights_sha256:
        raise CheckpointError(f"{path}: weights do not match their recorded sha256 (corrupt file?)")
    model = create_model(meta.arch, **meta.arch_args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture {meta.arch}: {exc}") from None
    return model.to(device).eval(), meta


def update_metadata(path: str | os.PathLike, **changes: Any) -> CheckpointMeta:
    """Rewrite a checkpoint's metadata (for example metrics measured later), atomically.

    The tensors are copied unchanged, so the weights' sha256 stays the same (checked).
    ``metrics`` given here are merged into the existing metrics; other fields replace.
    """
    path = Path(path)
    meta = read_metadata(path)
    tensors = load_tensors(path)
    for key, value in changes.items():
        if key not in CheckpointMeta.__dataclass_fields__ or key == "weights_sha256":
            raise ValueError(f"cannot update metadata field {key!r}")
        if key == "metrics":
            meta.metrics = {**meta.metrics, **value}
        else:
            setattr(meta, key, value)
    state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    if meta.weights_sha256 and weights_sha256(state) != meta.weights_sha256:
        raise CheckpointError(f"{path}: weights do not match their recorded sha256 (corrupt file?)")
    _atomic_save(tensors, {META_KEY: meta.to_json()}, path)
    return meta
