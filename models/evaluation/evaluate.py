"""Evaluate a checkpoint on a data set: accuracy, and optionally both ARAs (CLI, workers)."""

from __future__ import annotations

import os
import time
from typing import Any

from models.data.datasets import load_dataset
from models.data.sources import portable_path
from models.data.splits import seeded_subset
from models.defaults import ARA_SEED
from models.errors import BadParameterError, DataError
from models.evaluation.accuracy import accuracy
from models.nn.runtime import full_precision, model_device, pick_device
from models.perturb.ara import compute_ara
from models.render.plots import plot_ara
from models.store.checkpoint import load_checkpoint, update_metadata
from models.store.discovery import served_name


@full_precision()
def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    *,
    n: int | None = None,
    seed: int = ARA_SEED,
    ara: bool = False,
    plot: str | os.PathLike | None = None,
    batch_size: int = 100,
    device: str | None = None,
    split: str = "test",
    progress: bool = False,
    record: bool = False,
) -> dict[str, Any]:
    """Accuracy (and with ``ara`` both ARAs) on the seeded subset of ``data``'s split.

    The subset is ``randperm(len, Generator().manual_seed(seed))[:n]`` over the data set's
    path order (the shared rule). Returns a JSON-ready dict. With ``record`` the figures are
    written into the checkpoint's metrics: with ``ara`` both ARAs and the per-image radii
    (which the stability score ranks single images against); without it the accuracy, which
    then must be over the whole split (``n`` None). CUDA runs in plain float32 (no TF32), so
    the figures match a CPU's.
    """
    if record and not ara and n is not None:
        raise BadParameterError("recording an accuracy needs the whole split: drop --n (or add --ara to record ARA)")
    t0 = time.perf_counter()
    model, meta = load_checkpoint(checkpoint, device=pick_device(device))
    ds = load_dataset(data, split=split, input_size=meta.input_size, in_channels=meta.in_channels)
    if list(ds.classes) != list(meta.classes) and not all(c.isdigit() for c in ds.classes):
        raise DataError(
            f"the data set's classes {ds.classes} differ from the checkpoint's {meta.classes}; "
            "labels would not mean the same classes"
        )
    idx = seeded_subset(len(ds), n, seed)
    images, labels = ds.images[idx], ds.labels[idx]
    out: dict[str, Any] = {}
    if ara:
        res = compute_ara(model, images, labels, batch_size=batch_size, progress=progress)
        out.update(accuracy=res.accuracy, attack_ara=res.attack_ara, btr_ara=res.btr_ara)
        if record:
            update_metadata(checkpoint, metrics=res.metrics_record(portable_path(data), seed))
            out["recorded"] = True
        if plot:
            name = served_name(checkpoint)
            plot_ara(res, plot, title=f"{name}: n = {res.n}, accuracy {res.accuracy:.3f}")
            out["plot"] = str(plot)
    else:
        out.update(
            accuracy=accuracy(model, images, labels, batch_size=max(batch_size, 256), progress=progress),
            attack_ara=None,
            btr_ara=None,
        )
        if record:
            update_metadata(
                checkpoint,
                metrics={
                    f"{split}_accuracy": out["accuracy"],
                    f"{split}_n": int(labels.numel()),
                    f"{split}_source": portable_path(data),
                    f"{split}_device": str(model_device(model)),
                },
            )
            out["recorded"] = True
    out.update(
        n=int(labels.numel()),
        seed=seed,
        seconds=round(time.perf_counter() - t0, 3),
        checkpoint=str(checkpoint),
        data=str(data),
        device=str(model_device(model)),
    )
    return out
