"""Arrays and tensors into PNG bytes: the one encoder of every picture aex returns."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from models.errors import BadParameterError


def to_uint8_image(chw: torch.Tensor) -> np.ndarray:
    """C x H x W float (clamped to [0, 1]) -> uint8 H x W x 3, or H x W for one channel."""
    arr = chw.detach().float().cpu().clamp(0.0, 1.0).numpy()
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise BadParameterError(f"expected C x H x W with C = 1 or 3, got {arr.shape}")
    arr = (arr * 255.0 + 0.5).astype(np.uint8)
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def to_png_bytes(arr: np.ndarray) -> bytes:
    """uint8 H x W (grey) or H x W x 3 (RGB), or float in [0, 1], -> PNG bytes."""
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
