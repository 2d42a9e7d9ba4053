"""Plots a person would rather look at than read: the accuracy-robustness curves A(rho)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.perturb.ara import AraResult


def plot_ara(result: AraResult, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of A(rho) for both searches, with the chance level 1/C and both areas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot, so the caller's backend is never changed.
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for curve, label, ara in (
        (result.attack_curve, "attack (l2min)", result.attack_ara),
        (result.btr_curve, "better than random (btr)", result.btr_ara),
    ):
        ax.step(curve.rho, curve.accuracy, where="post", label=f"{label}: ARA {ara:.4f}")
    ax.axhline(1.0 / result.num_classes, color="grey", linestyle="--", linewidth=1, label="chance 1/C")
    ax.set_xlabel("perturbation budget ρ (RMS, pixels in [0, 1])")
    ax.set_ylabel("accuracy A(ρ)")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.set_title(title or f"Accuracy under perturbation (n = {result.n}, clean accuracy {result.accuracy:.3f})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
