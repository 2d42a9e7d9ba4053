"""Pictures of an explanation: the input, each x + delta and its amplified difference, the
Grad-CAM heat map and overlay, as PNG bytes in memory, with the summary naming them (made
apart from the algorithms, which return tensors)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.render.png import to_png_bytes, to_uint8_image

if TYPE_CHECKING:  # types only: the algorithms never depend on their pictures, nor these on them
    from models.explain.adversarial import Explanation, TargetExplanation


def explanation_uint8(target: TargetExplanation) -> np.ndarray:
    """The explanation image x + delta clamped to [0, 1] for display, as uint8."""
    return to_uint8_image(target.image)


def difference_uint8(target: TargetExplanation) -> np.ndarray:
    """The perturbation amplified for display: 0.5 + delta / (2 max|delta|), as uint8
    (mid-grey = unchanged; a zero delta gives a flat grey image)."""
    peak = float(target.delta.abs().max())
    scaled = 0.5 + target.delta / (2.0 * peak) if peak > 0 else torch.full_like(target.delta, 0.5)
    return to_uint8_image(scaled)


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:40] or "class"


def render_explanation(
    explanation: Explanation,
    gradcam_map: torch.Tensor | None = None,
    extra_summary: dict | None = None,
) -> tuple[dict, dict[str, bytes]]:
    """The summary and the PNGs of an explanation, in memory: (summary, {file name: PNG bytes}).

    Files: input.png (the input as the model saw it), gradcam.png and gradcam_overlay.png
    (with a map), and per target ``NN_role_class.png`` (x + delta) and ``..._diff.png`` (the
    amplified difference). The summary names them under "files" and in each target."""
    from models.render.colormap import heatmap_rgb, overlay_rgb

    files = {"input.png": to_png_bytes(to_uint8_image(explanation.input))}
    summary = {**(extra_summary or {}), **explanation.summary(), "files": {"input": "input.png"}}
    if gradcam_map is not None:
        files["gradcam.png"] = to_png_bytes(heatmap_rgb(gradcam_map))
        files["gradcam_overlay.png"] = to_png_bytes(overlay_rgb(explanation.input, gradcam_map))
        summary["files"].update(gradcam="gradcam.png", gradcam_overlay="gradcam_overlay.png")
    for i, (t, s) in enumerate(zip(explanation.targets, summary["targets"])):
        stem = f"{i:02d}_{t.role}_{_safe_name(t.class_name)}"
        files[f"{stem}.png"] = to_png_bytes(explanation_uint8(t))
        files[f"{stem}_diff.png"] = to_png_bytes(difference_uint8(t))
        s["image"], s["difference"] = f"{stem}.png", f"{stem}_diff.png"
    return summary, files


def write_files(out_dir: str | os.PathLike, summary: dict, files: dict[str, bytes]) -> None:
    """Write ``files`` and summary.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def write_explanation(
    out_dir: str | os.PathLike,
    explanation: Explanation,
    gradcam_map: torch.Tensor | None = None,
    extra_summary: dict | None = None,
) -> dict:
    """Write input.png, (gradcam.png, gradcam_overlay.png), one PNG per target and its
    amplified difference, and summary.json into ``out_dir``. Returns the summary."""
    summary, files = render_explanation(explanation, gradcam_map, extra_summary)
    write_files(out_dir, summary, files)
    return summary
