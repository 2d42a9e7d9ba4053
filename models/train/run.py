"""The state of a training run and how it survives a kill: the ``Run`` record, the
checkpoints written at the end of every epoch, resuming from them, and the metrics log.

At the end of every epoch the run is checkpointed atomically: ``<out>`` (the served
checkpoint: weights and metadata only) and ``<stem>.resume.safetensors`` (weights,
optimiser momentum, psi state, epoch and step counters, global RNG state), and one JSON
line is appended to ``<stem>.metrics.jsonl``. Only rank 0 writes files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.data.sources import data_digest, portable_source
from models.dicom.class_codes import class_code_map
from models.store.checkpoint import CheckpointMeta, load_tensors, read_metadata, save_checkpoint
from models.train.config import DATA_FIELDS, TrainConfig, portable_recipe, resume_path
from models.train.data import Splits
from models.train.distributed import DistInfo
from models.train.penalty import AdaptivePsi
from models.train.schedules import LRSchedule
from models.train.state import optimizer_from_tensors, optimizer_to_tensors, restore_rng, rng_tensors


@dataclass
class Run:
    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    splits: Splits
    aug_kind: str
    arch_args: dict[str, Any]
    net: nn.Module
    model: nn.Module  # net, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    schedule: LRSchedule
    psi: AdaptivePsi | None
    class_weight: torch.Tensor | None = None
    data_refs: dict[str, dict[str, str]] = field(default_factory=dict)  # data.data_refs
    epochs_done: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


def checkpoint_meta(run: Run, extra: dict[str, Any] | None = None) -> CheckpointMeta:
    train = run.splits.train
    last = run.history[-1] if run.history else {}
    metrics: dict[str, Any] = {"epochs_done": run.epochs_done}
    for key in ("loss", "penalty", "train_accuracy", "val_accuracy", "val_n"):
        if key in last:
            metrics[key] = last[key]
    if run.splits.val_source:
        metrics["val_source"] = portable_source(run.splits.val_source, run.splits.val_file)
    metrics.update(run.final)
    return CheckpointMeta(
        arch=run.cfg.arch,
        arch_args=run.arch_args,
        classes=list(train.classes),
        input_size=train.input_size,
        in_channels=train.in_channels,
        mean=list(run.arch_args["mean"]),
        std=list(run.arch_args["std"]),
        recipe=portable_recipe(run.cfg, run.data_refs),
        psi_state=run.psi.state_dict() if run.psi is not None else None,
        metrics=metrics,
        extra=extra or {},
        class_codes=class_code_map(run.cfg.class_code or [], train.classes),
    )


def save_run(run: Run) -> None:
    """Write the resume file, then the served checkpoint (both atomic). Rank 0 only."""
    if not run.info.is_main:
        return
    opt_tensors, opt_doc = optimizer_to_tensors(run.opt)
    finished = run.epochs_done >= run.cfg.epochs and bool(run.final or run.splits.test is None)
    state = {
        "epochs_done": run.epochs_done,
        "global_step": run.global_step,
        "optimizer": opt_doc,
        "history": run.history,
        "finished": finished,
        "world_size": run.info.world,
    }
    save_checkpoint(
        resume_path(run.cfg.out), run.net, checkpoint_meta(run, {"resume": state}), {**opt_tensors, **rng_tensors()}
    )
    save_checkpoint(run.cfg.out, run.net, checkpoint_meta(run))


def load_resume(run: Run) -> None:
    """Restore weights, optimiser, psi, counters and RNG from the resume file."""
    path = resume_path(run.cfg.out)
    meta = read_metadata(path)
    tensors = load_tensors(path)
    state = meta.extra["resume"]
    net_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    run.net.load_state_dict(net_state, strict=True)
    optimizer_from_tensors(run.opt, tensors, state["optimizer"])
    if run.psi is not None and meta.psi_state is not None:
        run.psi.load_state_dict(meta.psi_state)
    restore_rng(tensors)
    run.epochs_done = int(state["epochs_done"])
    run.global_step = int(state["global_step"])
    run.history = list(state.get("history", []))
    if state.get("finished"):
        run.final = {k: v for k, v in meta.metrics.items() if k.startswith(("test_", "ara_", "final_"))}


def stored_config(out: str | os.PathLike) -> TrainConfig | None:
    """The config a previous run at ``out`` was started with (None if there is none).

    The checkpoint records a data set typed as an absolute (or climbing) path by its name
    only (``data_reference``). Such a data set is looked for as that name in the working
    directory, then beside ``out``, and taken only where its sha256 (a folder: its listing
    digest) is the recorded one; otherwise the name stays, and resuming needs ``--data``
    (``--val-data``, ``--test-data``) typed again."""
    path = resume_path(out)
    if not path.is_file():
        return None
    recipe = read_metadata(path).recipe
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in recipe.items() if k in known})
    refs = recipe.get("data_refs") or {}
    for name in DATA_FIELDS:
        ref, value = refs.get(name), getattr(cfg, name)
        if value and isinstance(ref, dict) and "name" in ref:
            found = locate_data(ref, [Path(value), Path(out).parent / ref["name"]])
            if found is not None:
                setattr(cfg, name, found)
    return cfg


def stored_data_refs(out: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The ``data_refs`` the resume state at ``out`` recorded ({} for none, or an older file)."""
    path = resume_path(out)
    return dict(read_metadata(path).recipe.get("data_refs") or {}) if path.is_file() else {}


def locate_data(ref: dict[str, str], candidates: list[Path]) -> str | None:
    """The first candidate whose digest is the one ``ref`` records (None: none is)."""
    want = {k: v for k, v in ref.items() if k in ("sha256", "listing_sha256")}
    for cand in candidates:
        if want and cand.exists() and data_digest(cand) == want:
            return str(cand)
    return None


def rewrite_metrics_log(path: Path, epochs_done: int) -> None:
    """Drop lines a killed run wrote after its last checkpoint."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "epoch" and rec.get("epoch", 0) <= epochs_done:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
