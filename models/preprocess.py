"""Preprocessing, defined once and shared by the trainer, the CLI and the workers.

Normalisation lives inside the models, so every tensor here is pixels in [0, 1].
Augmentations work on whole uint8 or float batches (N x C x H x W) on any device, so the
trainer never goes back to PIL after the first decode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .imaging import match_channels, open_image, prepare_array, resize_center

if TYPE_CHECKING:
    from .dicom_input import DicomImage

# Augmentation recipe per kind of data set (replicate pad, random crop, horizontal flip).
# Chest X-rays are not flipped: left and right are anatomically different.
AUGMENTATIONS: dict[str, dict[str, int | bool]] = {
    "cifar10": {"pad": 4, "flip": True},
    "natural": {"pad": 4, "flip": True},
    "medical": {"pad": 2, "flip": False},
    "none": {"pad": 0, "flip": False},
}


def array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """float32 H x W x C in [0, 1] -> float32 tensor C x H x W in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()


def load_image_for_model(
    source: str | os.PathLike | bytes, input_size: int, in_channels: int, max_pixels: int | None = None
) -> torch.Tensor:
    """Decode an image file or bytes into the model's input: float C x H x W in [0, 1]."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    img = open_image(data, max_pixels) if max_pixels else open_image(data)
    return array_to_tensor(prepare_array(img, input_size, in_channels))


def load_dicom_for_model(
    data: bytes, input_size: int, in_channels: int, window: tuple[float, float] | None = None
) -> tuple[torch.Tensor, DicomImage]:
    """A single-frame DICOM file into the model's input (float C x H x W in [0, 1]), through
    the DICOM display pipeline (``models.dicom_input``: Modality LUT, VOI window or the
    ``window`` = (center, width) override, MONOCHROME1 inversion) and then the same channel
    matching and resize/centre-crop as any other image. Also returns the parsed DicomImage."""
    from .dicom_input import load_dicom_pixels  # pydicom only when DICOM comes in

    dicom = load_dicom_pixels(data, window)
    arr = resize_center(match_channels(dicom.pixels, in_channels), input_size)
    return array_to_tensor(arr), dicom


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch in [0, 255] -> float32 in [0, 1]; float input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def augment_batch(images: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random replicate-pad + crop (+ horizontal flip) of a float batch N x C x H x W.

    Randomness comes from ``generator`` (CPU), so a resumed run draws the same crops.
    """
    recipe = AUGMENTATIONS[kind]
    n, _, h, w = images.shape
    pad = int(recipe["pad"])
    out = images
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(images.device)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(images.device)
        idx_n = torch.arange(n, device=images.device).view(n, 1, 1)
        # Gather the crop for every image at once: (N, H, W) index into (N, C, H+2p, W+2p).
        out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if recipe["flip"]:
        flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
    return out.contiguous()
