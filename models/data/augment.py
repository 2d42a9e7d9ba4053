"""Augmentation of whole batches (replicate pad, random crop, horizontal flip) on any device,
so the trainer never goes back to PIL after the first decode; one recipe per kind of data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    pass


# Augmentation recipe per kind of data set (replicate pad, random crop, horizontal flip).
# Chest X-rays are not flipped: left and right are anatomically different.
AUGMENTATIONS: dict[str, dict[str, int | bool]] = {
    "cifar10": {"pad": 4, "flip": True},
    "natural": {"pad": 4, "flip": True},
    "medical": {"pad": 2, "flip": False},
    "none": {"pad": 0, "flip": False},
}


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
