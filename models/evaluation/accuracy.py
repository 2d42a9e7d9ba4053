"""Accuracy, the one implementation: predictions in batches, top-1 accuracy and per-class
recall, used by ``aex evaluate``, the trainer's per-epoch and final figures and the tests."""

from __future__ import annotations

import torch
from torch import nn

from models.data.tensors import to_float
from models.nn.runtime import eval_mode, model_device


def predictions(model: nn.Module, images: torch.Tensor, batch_size: int = 500, progress: bool = False) -> torch.Tensor:
    """Top-1 class of every image, in eval mode (each submodule's flag restored afterwards).

    images: uint8 N x C x H x W in [0, 255] or float in [0, 1], any device (each batch moves
    to the model's). Returns int64 N on the CPU."""
    device = model_device(model)
    starts = range(0, int(images.shape[0]), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="accuracy", unit="batch", leave=False)
    out = []
    with eval_mode(model), torch.no_grad():
        for s in starts:
            out.append(model(to_float(images[s : s + batch_size].to(device))).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500, progress: bool = False
) -> float:
    """Top-1 accuracy. images: uint8 N x C x H x W (or float in [0, 1]); labels: N int64."""
    preds = predictions(model, images, batch_size, progress)
    return int((preds == labels.cpu()).sum()) / max(1, int(labels.numel()))


def class_accuracy(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Recall of each class (accuracy over its images; 0 for a class with no image)."""
    out = []
    for c in range(num_classes):
        sel = labels == c
        out.append(float((preds[sel] == c).double().mean()) if bool(sel.any()) else 0.0)
    return out
