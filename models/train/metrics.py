"""The trainer's figures: validation accuracy per epoch (split over ranks under DDP), and at
the end test accuracy, per-class recall and both ARAs on the seeded subset, in plain float32."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from torch import nn

from models.data.datasets import ImageSet
from models.data.sources import portable_path, portable_source
from models.data.splits import seeded_subset
from models.evaluation.accuracy import class_accuracy as per_class
from models.evaluation.accuracy import predictions
from models.nn.runtime import full_precision
from models.train.distributed import DistInfo, all_reduce_sum
from models.train.run import Run


def evaluate(
    net: nn.Module, data: ImageSet, device: torch.device, batch_size: int = 256, info: DistInfo | None = None
) -> tuple[float, int]:
    """Accuracy of ``net`` on ``data``; with ``info`` each rank takes every world-th image and
    the counts are summed. Returns (accuracy, n). ``device``: where ``net`` is (batches move
    there)."""
    info = info or DistInfo()
    idx = torch.arange(len(data))[info.rank :: info.world]
    correct = int((predictions(net, data.images[idx], batch_size) == data.labels[idx]).sum())
    totals = all_reduce_sum(torch.tensor([correct, idx.numel()], dtype=torch.float64), info)
    n = int(totals[1])
    return float(totals[0]) / max(n, 1), n


def class_accuracy(net: nn.Module, data: ImageSet, device: torch.device, batch_size: int = 256) -> list[float]:
    """Recall of each class on ``data`` (0 for an absent class)."""
    return per_class(predictions(net, data.images, batch_size), data.labels, len(data.classes))


@full_precision()  # no TF32: the figures must be what `aex evaluate` gives on a CPU
def final_metrics(run: Run) -> dict[str, Any]:
    """Test accuracy over the whole test set, then attack and BTR ARA on the seeded subset."""
    cfg = run.cfg
    out: dict[str, Any] = {}
    test = run.splits.test
    if test is None:
        return out
    t0 = time.perf_counter()
    acc, n = evaluate(run.net, test, run.device)
    out.update(
        test_accuracy=acc,
        test_n=n,
        test_source=portable_source(run.splits.test_source, run.splits.test_file),
        test_class_accuracy=class_accuracy(run.net, test, run.device),
    )
    if cfg.ara_n > 0:
        # The ARA bar ticks ten times a second: only on a terminal, not into a log file.
        out.update(ara_metrics(run.net, test, cfg.ara_n, cfg.ara_seed, cfg.progress and sys.stderr.isatty()))
    out["final_eval_seconds"] = time.perf_counter() - t0
    return out


def ara_metrics(net: nn.Module, test: ImageSet, n: int, seed: int, progress: bool = False) -> dict[str, Any]:
    """Attack and BTR ARA on the seeded subset (the shared subset rule) of ``test``.

    The reference checks that every search settles in its first half; if one does not, the
    figures are still computed (and flagged) rather than losing the end of a long run."""
    from models.errors import BoundNotReachedError
    from models.perturb.ara import compute_ara  # shared with `aex evaluate`

    idx = seeded_subset(len(test), n, seed)
    images, labels = test.images[idx], test.labels[idx]
    bound_ok = True
    try:
        res = compute_ara(net, images, labels, progress=progress)
    except BoundNotReachedError as exc:
        print(f"warning: {exc}; computing ARA without the bound check", file=sys.stderr)
        bound_ok = False
        res = compute_ara(net, images, labels, progress=progress, bound_check=False)
    record = res.metrics_record(portable_path(test.source), seed)
    record["ara_bound_check_passed"] = bound_ok
    return record
