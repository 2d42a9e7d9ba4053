"""The checkpoints a worker process serves, loaded once before it takes any job."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobs.settings import Settings
from models.data.sources import file_sha256
from models.errors import CheckpointError, UnknownModelError
from models.explain.gradcam import default_gradcam_layer, layer_name
from models.nn.graph import graph_forward
from models.nn.inference import inference_copy
from models.nn.runtime import pick_device
from models.store.checkpoint import CheckpointMeta, load_checkpoint
from models.store.discovery import catalogue_entry, discover_checkpoints
from models.store.header import read_checkpoint_metadata

log = logging.getLogger("aex.worker")


@dataclass
class ServedModel:
    """One loaded checkpoint: the network in eval mode on ``device`` and its metadata.
    ``classifier``: the network classify's forward pass runs, made once at load (a served
    model's weights never change): on the CPU its fused channels-last copy
    (``models.nn.inference``) as a frozen TorchScript graph with oneDNN's convolutions
    (``models.nn.graph``; the eager copy where the graph is not that copy to float rounding),
    elsewhere the model itself. Looking the copy up in ``inference_copy``'s cache at every
    batch walked the model's 306 tensors for its key (0.12 ms on the 2-core machine, more with
    its caches taken by other processes)."""

    name: str
    path: Path
    model: nn.Module
    meta: CheckpointMeta
    device: torch.device
    classifier: nn.Module
    checkpoint_sha256: str = ""  # of the file as loaded (weights and metadata, metrics included)

    @classmethod
    def load(cls, name: str, path: Path, device: torch.device) -> ServedModel:
        """Load one checkpoint for serving: eval mode, no parameter gradients (explanations
        need input gradients only), and one forward pass so the first job does not pay
        torch's warm-up (on the CPU, also through the fused copy classify runs and its graph,
        which it builds and checks: ``models.nn.inference``, ``models.nn.graph``)."""
        model, meta = load_checkpoint(path, device=device)
        model.requires_grad_(False)
        x = torch.zeros(1, meta.in_channels, meta.input_size, meta.input_size, device=device)
        with torch.no_grad():
            model(x)
        classifier = model
        if device.type == "cpu":
            copy = inference_copy(model)
            classifier, why_not = graph_forward(copy, x.contiguous(memory_format=torch.channels_last))
            if why_not is not None:
                log.warning("model %s: classify runs the eager fused copy: %s", name, why_not)
        return cls(name, Path(path), model, meta, device, classifier, file_sha256(path))

    @property
    def gradcam_layer(self) -> str:
        """The dotted name of the model's default Grad-CAM layer."""
        return layer_name(self.model, default_gradcam_layer(self.model))

    def catalogue_entry(self) -> dict[str, Any]:
        """What GET /v1/models shows, plus the layer names the API may accept for Grad-CAM."""
        entry = catalogue_entry(self.name, self.path, read_checkpoint_metadata(self.path))
        entry["gradcam_layer"] = self.gradcam_layer
        entry["layers"] = [n for n, _ in self.model.named_modules() if n]
        entry["device"] = self.device.type
        entry["checkpoint_sha256"] = self.checkpoint_sha256
        return entry


class ServedModels:
    """Name -> ServedModel for every checkpoint in the settings' folders."""

    def __init__(self, models: dict[str, ServedModel]):
        self.models = models

    @classmethod
    def load(cls, settings: Settings) -> ServedModels:
        """Load every checkpoint found in ``settings.checkpoint_dirs()`` onto the worker's
        device. A folder named in AEX_MODEL_DIRS that does not exist, a checkpoint that does
        not load, or no checkpoint at all stops the worker with CheckpointError: a worker
        that silently serves less than it was told to is worse than one that does not start."""
        missing = [str(d) for d in settings.model_dirs if not Path(d).is_dir()]
        if missing:
            raise CheckpointError(f"AEX_MODEL_DIRS names folders that do not exist: {', '.join(missing)}")
        device = pick_device(settings.device)
        paths = discover_checkpoints(settings.checkpoint_dirs())
        if not paths:
            raise CheckpointError(
                "no checkpoints to serve in "
                + ", ".join(str(d) for d in settings.checkpoint_dirs())
                + " (expected <name>/model.safetensors or <name>.safetensors)"
            )
        models = {}
        for name, path in paths.items():
            models[name] = served = ServedModel.load(name, path, device)
            log.info(
                "serving %s (%s, %d classes) from %s on %s",
                name,
                served.meta.arch,
                len(served.meta.classes),
                path,
                device,
            )
        return cls(models)

    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(
                f"model {name!r} is not served by this worker; served: {', '.join(sorted(self.models))}"
            ) from None

    def catalogue(self) -> list[dict[str, Any]]:
        return [m.catalogue_entry() for m in self.models.values()]
