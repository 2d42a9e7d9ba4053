"""Evaluate a checkpoint on a data set: accuracy, and optionally both ARAs, AutoAttack robust
accuracy and the randomisation sanity check of the maps (CLI, workers)."""

from __future__ import annotations

import os
import time
from typing import Any

from models.data.datasets import load_dataset
from models.data.sources import portable_path
from models.data.splits import seeded_subset
from models.defaults import ARA_SEED, AUTOATTACK_ATTACKS, SANITY_N
from models.errors import BadParameterError, DataError
from models.evaluation.accuracy import accuracy
from models.nn.runtime import full_precision, model_device, pick_device
from models.perturb.ara import compute_ara
from models.render.plots import plot_ara
from models.store.checkpoint import load_checkpoint, read_metadata, update_metadata
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
    autoattack: bool = False,
    autoattack_attacks: str = AUTOATTACK_ATTACKS,
    autoattack_eps: float | None = None,
    sanity: bool = False,
    sanity_n: int = SANITY_N,
    stability: bool = False,
    faithfulness: bool = False,
) -> dict[str, Any]:
    """Accuracy (and with ``ara`` both ARAs) on the seeded subset of ``data``'s split.

    The subset is ``randperm(len, Generator().manual_seed(seed))[:n]`` over the data set's
    path order (the shared rule). Returns a JSON-ready dict. With ``record`` the figures are
    written into the checkpoint's metrics: with ``ara`` both ARAs and the per-image radii
    (which the stability score ranks single images against); without it the accuracy, which
    then must be over the whole split (``n`` None). CUDA runs in plain float32 (no TF32), so
    the figures match a CPU's.

    With ``autoattack``: AutoAttack robust accuracy in L2 on the same subset
    (``models.evaluation.autoattack``; ``autoattack_eps`` the L2 budget, None: RMS 0.5 /
    sqrt(3072), which is eps 0.5 on CIFAR-10; ``autoattack_attacks``: "standard" or a list
    such as "apgd-ce,apgd-t"). With ``sanity``: the cascading randomisation check of Grad-CAM
    and the adversarial explanations (``models.evaluation.sanity``) on the first ``sanity_n``
    images of the subset. With ``stability``: the fast stability search's per-image radii
    and their agreement with the exact radii the checkpoint records for the same subset
    (``models.evaluation.stability``). With ``faithfulness``: how often the Grad-CAM and
    adversarial explanation maps beat a random pixel order in deletion and insertion, on the
    correctly classified images of the subset (``models.evaluation.faithfulness``). ``record``
    stores each of them in the metrics too.
    """
    if record and not (ara or autoattack or sanity or stability or faithfulness) and n is not None:
        raise BadParameterError(
            "recording an accuracy needs the whole split: drop --n (or add --ara, --autoattack, --sanity, "
            "--stability or --faithfulness)"
        )
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
        if record and n is None:
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
    if autoattack:
        out["autoattack"] = _autoattack(
            model, images, labels, checkpoint, data, seed, record, autoattack_attacks, autoattack_eps, batch_size
        )
    if stability:
        out["stability"] = _stability(model, images, labels, checkpoint, data, seed, record, progress)
    if sanity:
        out["sanity"] = _sanity(model, images[:sanity_n], checkpoint, data, seed, record)
    if faithfulness:
        out["faithfulness"] = _faithfulness(model, images, labels, checkpoint, data, seed, record)
    out.update(
        n=int(labels.numel()),
        seed=seed,
        seconds=round(time.perf_counter() - t0, 3),
        checkpoint=str(checkpoint),
        data=str(data),
        device=str(model_device(model)),
    )
    return out


def _stability(model, images, labels, checkpoint, data, seed, record, progress) -> dict[str, Any]:
    """Fast radii on the subset, compared with the recorded exact ones (same subset)."""
    from models.evaluation.stability import fast_radii, fast_radii_record
    from models.perturb.stability import FAST_RADII

    t = time.perf_counter()
    radii = fast_radii(model, images, labels, progress=progress)
    exact = read_metadata(checkpoint).metrics.get("ara_radii")
    rec = fast_radii_record(radii, portable_path(data), seed, exact)
    out = {"n": rec["n"], "seconds": round(time.perf_counter() - t, 3), "settings": rec["settings"]}
    out["agreement"] = rec.get("agreement") or "the checkpoint records no exact radii of this subset"
    if record:
        update_metadata(checkpoint, metrics={FAST_RADII: rec})
        out["recorded"] = True
    return out


def _autoattack(model, images, labels, checkpoint, data, seed, record, attacks, eps, batch_size) -> dict[str, Any]:
    from models.defaults import AUTOATTACK_RMS
    from models.evaluation.autoattack import autoattack_accuracy, l2_eps

    rms = AUTOATTACK_RMS if eps is None else float(eps) / l2_eps(tuple(images.shape[1:]), 1.0)
    res = autoattack_accuracy(model, images, labels, attacks=attacks, rms=rms, seed=seed, batch_size=batch_size)
    out = {
        "robust_accuracy": res.robust_accuracy,
        "clean_accuracy": res.clean_accuracy,
        "n": res.n,
        "seed": seed,
        **res.settings,
        "seconds": round(res.seconds, 3),
    }
    if record:
        update_metadata(checkpoint, metrics=res.metrics_record(portable_path(data), seed))
        out["recorded"] = True
    return out


def _sanity(model, images, checkpoint, data, seed, record) -> dict[str, Any]:
    from models.evaluation.sanity import sanity_check

    res = sanity_check(model, images)
    res["subset_seed"] = seed
    res["data"] = portable_path(data)
    res["seconds"] = round(res["seconds"], 3)
    if record:
        last = res["stages"][-1]
        update_metadata(
            checkpoint,
            metrics={
                "sanity_check": res,
                "sanity_gradcam_spearman": last["gradcam"]["spearman"]["mean"],
                "sanity_adversarial_spearman": last["adversarial"]["spearman"]["mean"],
            },
        )
        res = {**res, "recorded": True}
    return res


def _faithfulness(model, images, labels, checkpoint, data, seed, record) -> dict[str, Any]:
    from models.evaluation.faithfulness import dataset_faithfulness

    res = dataset_faithfulness(model, images, labels)
    res.update(seed=seed, data=portable_path(data), seconds=round(res["seconds"], 3))
    if record:
        update_metadata(
            checkpoint,
            metrics={
                "faithfulness": res,
                "faithfulness_gradcam_deletion_below_random": res["gradcam"].get("deletion_below_random"),
            },
        )
        res = {**res, "recorded": True}
    return res
