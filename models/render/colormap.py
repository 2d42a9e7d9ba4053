"""Colour maps of [0, 1] saliency maps: the heat map (a matplotlib colour map) and its overlay
on the input image, as uint8 RGB arrays."""

from __future__ import annotations

import numpy as np
import torch

from models.errors import BadParameterError


def _to_numpy_map(cam) -> np.ndarray:
    arr = cam.detach().float().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam, np.float32)
    if arr.ndim != 2:
        raise BadParameterError(f"a Grad-CAM map must be H x W, got shape {arr.shape}")
    return np.clip(arr, 0.0, 1.0)


def heatmap_rgb(cam, colormap: str = "jet") -> np.ndarray:
    """H x W map in [0, 1] -> uint8 H x W x 3 RGB heat map (matplotlib colormap)."""
    from matplotlib import colormaps

    rgba = colormaps[colormap](_to_numpy_map(cam))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay_rgb(image: torch.Tensor | np.ndarray, cam, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Blend the heat map over the input: uint8 H x W x 3 = alpha*heat + (1-alpha)*image.

    image: C x H x W float in [0, 1] (C = 1 or 3; grey is repeated to RGB)."""
    if not 0.0 <= alpha <= 1.0:
        raise BadParameterError(f"alpha must be in [0, 1], got {alpha}")
    img = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise BadParameterError(f"image must be C x H x W with C = 1 or 3, got {img.shape}")
    img = np.clip(img, 0.0, 1.0).transpose(1, 2, 0)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    heat = heatmap_rgb(cam, colormap).astype(np.float32) / 255.0
    if heat.shape[:2] != img.shape[:2]:
        raise BadParameterError(f"map {heat.shape[:2]} and image {img.shape[:2]} differ in size")
    return (np.clip(alpha * heat + (1.0 - alpha) * img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
