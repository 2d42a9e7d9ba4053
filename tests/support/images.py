"""Image files for the tests, made here: structured images (gradients plus noise) in any format and PIL mode, and a MedMNIST-like data set file."""

from __future__ import annotations

import io
from pathlib import Path


def encode_image(fmt: str, mode: str, size=(48, 40), seed: int = 0) -> bytes:
    """A structured test image (gradients plus noise) in ``fmt`` (PNG, JPEG, ...) and PIL
    ``mode`` (RGB, L, RGBA, P, I;16); ``size`` is (width, height)."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 0.8 + rng.random((h, w, 3)) * 0.2
    rgb8 = (rgb * 255).astype(np.uint8)
    if mode == "RGB":
        img = Image.fromarray(rgb8)
    elif mode == "L":
        img = Image.fromarray(rgb8[..., 0])
    elif mode == "RGBA":
        alpha = (np.linspace(64, 255, w)[None, :].repeat(h, 0)).astype(np.uint8)
        img = Image.fromarray(np.dstack([rgb8, alpha]))
    elif mode == "P":
        img = Image.fromarray(rgb8).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    elif mode == "I;16":
        img = Image.fromarray((rgb[..., 1] * 65535).astype(np.uint16))
    else:
        raise ValueError(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def write_tiny_medmnist(path: Path, n_train: int = 32, n_val: int = 8, n_test: int = 8, seed: int = 0) -> Path:
    """A MedMNIST-like .npz: 28x28 grey images, labels (N, 1); class 1 has a bright band."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 120, (n, 28, 28), dtype=np.uint8)
        images[labels == 1, 10:18, :] += 120
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path
