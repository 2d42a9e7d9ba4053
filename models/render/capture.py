"""The pictures that become DICOM Secondary Captures: each explanation picture enlarged to a readable size by whole-pixel blocks, with what it is and the model's input size written under it.

The model sees a small image (28 x 28 for the bundled pneumonia model); a viewer stretching
28 pixels over its viewport blurs them, and nothing says the model saw so few. So each
picture is enlarged by nearest neighbour by the smallest whole factor that makes its longer
side at least ``MIN_LONG_SIDE`` pixels (every model pixel a sharp square block, nothing
interpolated), and a caption band below it (not over it: no pixel of the picture is hidden)
says what it is, "model input 28 x 28 (one block = one model pixel)" (an "x": the bundled font
has no "×") and "not for diagnostic
use". The text is burned in, so the Secondary Capture says Burned In Annotation YES. The
font is Pillow's bundled default (the same on every machine with the pinned Pillow), so the
same picture gives the same pixels.

The PNGs of a job keep the model's size (``explanation.png_files``); only the Secondary
Captures are enlarged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_LONG_SIDE = 512  # pixels: the longer side of an enlarged picture is at least this
NOT_FOR_DIAGNOSIS = "not for diagnostic use"
FONT_SIZE = 18
LINE_HEIGHT = 24
MARGIN = 8


def scale_factor(height: int, width: int, min_long_side: int = MIN_LONG_SIDE) -> int:
    """The smallest whole factor that makes max(height, width) at least ``min_long_side`` (1
    when it is already)."""
    return max(1, math.ceil(min_long_side / max(1, height, width)))


def _rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr


def _wrap(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> list[str]:
    """``text`` in lines that fit ``width`` pixels (broken at spaces)."""
    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def readable(image: np.ndarray, title: str, input_size: int, min_long_side: int = MIN_LONG_SIDE) -> np.ndarray:
    """``image`` (uint8 or float [0, 1], H x W, H x W x 1 or x 3, as the model saw it) enlarged
    by ``scale_factor`` with whole-pixel blocks, above a black caption band: ``title``, then
    "model input {input_size} x {input_size} (one block = one model pixel)", then "not for
    diagnostic use", in white. Returns uint8 RGB (H * k + band) x (W * k) x 3."""
    rgb = _rgb(image)
    k = scale_factor(rgb.shape[0], rgb.shape[1], min_long_side)
    big = np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)
    width = big.shape[1]
    font = ImageFont.load_default(size=FONT_SIZE)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = []
    for text in (title, f"model input {input_size} x {input_size} (one block = one model pixel)", NOT_FOR_DIAGNOSIS):
        lines += _wrap(probe, font, text, width - 2 * MARGIN)
    band = Image.new("RGB", (width, len(lines) * LINE_HEIGHT + 2 * MARGIN), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * LINE_HEIGHT), line, fill=(255, 255, 255), font=font)
    return np.ascontiguousarray(np.concatenate([big, np.asarray(band)], axis=0))


def capture_pictures(
    pictures: Mapping[str, np.ndarray], summary: Mapping[str, Any], input_size: int
) -> list[tuple[str, str, np.ndarray]]:
    """(name, role, readable picture) of every Secondary Capture of an explanation: the
    Grad-CAM overlay ("gradcam_overlay"), then per target its x + delta ("explanation") and
    its amplified difference ("explanation_difference"), named as their PNGs without ".png".

    pictures: ``explanation.pictures`` by file name; summary: the explanation's summary
    (``predicted``, ``gradcam``, ``targets`` with the PNG names ``name_pictures`` gives);
    input_size: the side of the model's square input, in pixels."""
    classes: Sequence[str] = list(summary.get("probs") or {})
    cam = summary.get("gradcam") or {}
    explained = classes[cam["class_index"]] if "class_index" in cam and classes else summary["predicted"]["class_name"]
    out = [
        (
            "gradcam_overlay",
            "gradcam_overlay",
            readable(pictures["gradcam_overlay.png"], f"Grad-CAM of {explained}, over the model's input", input_size),
        )
    ]
    for target in summary["targets"]:
        what = f"{target['role']} {target['class_name']}"
        for key, role, title in (
            ("image", "explanation", f"adversarial explanation toward {what}: x + delta"),
            ("difference", "explanation_difference", f"adversarial explanation toward {what}: delta, amplified"),
        ):
            name = target[key]
            out.append((name[: -len(".png")], role, readable(pictures[name], title, input_size)))
    return out
