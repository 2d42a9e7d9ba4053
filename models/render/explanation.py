"""Pictures of an explanation: the input, each x + delta and its amplified difference, the
Grad-CAM heat map and overlay, as uint8 arrays (``pictures``: what the PNGs and the DICOM
Secondary Captures are both made from) and PNG bytes in memory, with the summary naming them
(made apart from the algorithms, which return tensors)."""

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


def _stems(explanation: Explanation) -> list[str]:
    return [f"{i:02d}_{t.role}_{_safe_name(t.class_name)}" for i, t in enumerate(explanation.targets)]


def name_pictures(summary: dict, explanation: Explanation, with_map: bool) -> dict:
    """``summary`` naming the pictures ``pictures`` renders: "files" (input, and with a map
    gradcam and gradcam_overlay) and each target's "image" and "difference"."""
    summary["files"] = {"input": "input.png"}
    if with_map:
        summary["files"].update(gradcam="gradcam.png", gradcam_overlay="gradcam_overlay.png")
    for stem, s in zip(_stems(explanation), summary["targets"]):
        s["image"], s["difference"] = f"{stem}.png", f"{stem}_diff.png"
    return summary


def pictures(explanation: Explanation, gradcam_map: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Every picture of an explanation as a uint8 array (H x W grey or H x W x 3 RGB), by the
    file name ``name_pictures`` gives it: input.png (the input as the model saw it),
    gradcam.png and gradcam_overlay.png (with a map), and per target ``NN_role_class.png``
    (x + delta) and ``..._diff.png`` (the amplified difference). The PNGs (``png_files``) and
    the DICOM Secondary Captures are both made from these arrays."""
    from models.render.colormap import heatmap_rgb, overlay_rgb

    arrays = {"input.png": to_uint8_image(explanation.input)}
    if gradcam_map is not None:
        arrays["gradcam.png"] = heatmap_rgb(gradcam_map)
        arrays["gradcam_overlay.png"] = overlay_rgb(explanation.input, gradcam_map)
    for stem, t in zip(_stems(explanation), explanation.targets):
        arrays[f"{stem}.png"] = explanation_uint8(t)
        arrays[f"{stem}_diff.png"] = difference_uint8(t)
    return {name: np.ascontiguousarray(arr) for name, arr in arrays.items()}


def png_files(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """``pictures`` encoded: {file name: PNG bytes}."""
    return {name: to_png_bytes(arr) for name, arr in arrays.items()}


def render_explanation(
    explanation: Explanation,
    gradcam_map: torch.Tensor | None = None,
    extra_summary: dict | None = None,
) -> tuple[dict, dict[str, bytes]]:
    """The summary and the PNGs of an explanation, in memory: (summary, {file name: PNG bytes})
    (``pictures``; the summary names them: ``name_pictures``)."""
    summary = {**(extra_summary or {}), **explanation.summary()}
    name_pictures(summary, explanation, gradcam_map is not None)
    return summary, png_files(pictures(explanation, gradcam_map))


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
