"""The offline trainer behind ``aex train``: plain functions (load data, build the network,
train one epoch, evaluate, save) and one ``train(config)`` that strings them together.

- Standard training, or ``robust``: HHReLU, no zero-init of the residual branches, and the
  Lipschitz-inspired input-gradient penalty with tandem zeta and adaptive psi
  (``models.train.penalty``).
- ``adv_train`` ``l2`` (bounded, eps 0.01) or ``l2min`` (eps 0.1): each batch is replaced by
  perturbed images from the perturbation engine (S=7, k=1, mu=0, no bound check, network in
  eval mode while it searches); with ``robust`` only a random half of each batch is perturbed.
- Data sets are decoded once into uint8 tensors (``models.data.datasets``); batches are sliced from
  them and augmented as whole tensors (``models.data.augment``).
- At the end of every epoch the run is checkpointed atomically: ``<out>`` (the served
  checkpoint: weights and metadata only) and ``<stem>.resume.safetensors`` (weights,
  optimiser momentum, psi state, epoch and step counters, global RNG state), and one JSON
  line is appended to ``<stem>.metrics.jsonl``. ``resume`` continues bit-identically.
- Under ``torchrun`` (``WORLD_SIZE`` > 1) the same code trains with DistributedDataParallel:
  the epoch's permutation is split by ``DistributedSampler``, the cross-entropy that drives
  psi is averaged over all ranks (so every rank holds the same psi), BatchNorm running
  statistics are averaged at the end of each epoch, and only rank 0 writes files.

The pieces live beside this module: ``config`` (the options), ``data`` (splits and epoch
batches), ``step`` (network, optimiser, one step and one epoch), ``metrics`` (validation and
final figures), ``run`` (run state, checkpoint and resume), ``state`` (RNG and optimiser
state), ``distributed`` (DDP helpers), ``penalty`` and ``schedules``. This module prepares a
run, trains its epochs and finishes it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.dicom.class_codes import class_code_map
from models.errors import BadParameterError
from models.train.config import TrainConfig, differing_fields, metrics_path, resume_path
from models.train.data import augmentation_kind, balanced_class_weights, data_refs, epoch_batches, load_splits
from models.train.distributed import DistInfo, average_buffers, init_distributed, rank_device
from models.train.metrics import evaluate, final_metrics
from models.train.penalty import AdaptivePsi
from models.train.process import training_settings
from models.train.run import (
    Run,
    append_metrics,
    load_resume,
    rewrite_metrics_log,
    save_run,
    stored_config,
    stored_data_refs,
)
from models.train.schedules import LRSchedule
from models.train.step import arch_args_for, build_model, build_optimizer, loss_target, train_one_epoch


def _log(msg: str, info: DistInfo) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


def prepare_run(cfg: TrainConfig) -> Run:
    """Load data, build network, optimiser, schedule and psi; join DDP; resume if asked."""
    cfg.validate()
    out = Path(cfg.out)
    has_state = resume_path(out).is_file()
    if cfg.resume and has_state:
        old = stored_config(out)
        diff = differing_fields(cfg, old)
        if diff:
            detail = ", ".join(f"{k}: {getattr(old, k)!r} -> {getattr(cfg, k)!r}" for k in diff)
            raise BadParameterError(
                f"--resume with different training options ({detail}); "
                "resume with the original options or train to a new --out"
            )
    elif (out.exists() or has_state) and not cfg.overwrite:
        if cfg.resume:
            raise BadParameterError(
                f"{out} exists but there is no resume state beside it "
                f"({resume_path(out).name}); pass --overwrite to start over"
            )
        raise BadParameterError(f"{out} already exists: pass --resume to continue it or --overwrite to start over")
    device = rank_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = init_distributed(device)

    old_refs = stored_data_refs(out) if cfg.resume and has_state else {}
    for role, ref in old_refs.items():
        typed = getattr(cfg, role, None)
        if "name" in ref and typed == ref["name"] and not cfg.download and not Path(typed).exists():
            raise BadParameterError(
                f"{out} records its {role.replace('_', ' ')} by name only ({ref['name']}) and no file "
                f"of that name and content is in the working directory or beside the checkpoint: "
                f"resume with --{role.replace('_', '-')} PATH"
            )
    splits = load_splits(cfg)
    class_code_map(cfg.class_code or [], splits.train.classes)  # each --class-code names a class
    refs = data_refs(cfg, splits)
    if old_refs:
        check_same_data(refs, old_refs, cfg)
    arch_args = arch_args_for(cfg, splits.train)
    net = build_model(cfg, arch_args).to(device)
    model: nn.Module = net
    if info.enabled:
        # BatchNorm buffers stay per rank during the epoch and are averaged at its end.
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    opt = build_optimizer(cfg, net)
    steps = len(epoch_batches(len(splits.train), cfg.batch_size, 0, cfg.seed, info))
    schedule = LRSchedule(cfg.schedule, cfg.lr, cfg.epochs, steps, list(cfg.milestones or []), cfg.warmup_epochs)
    psi = None
    if cfg.robust:
        psi = AdaptivePsi(
            cfg.psi0, cfg.k_psi, loss_target(cfg.l_target, len(splits.train.classes)), cfg.eps_better, cfg.eps_worse
        )
    run = Run(
        cfg,
        info,
        device,
        splits,
        augmentation_kind(cfg, splits.train),
        arch_args,
        net,
        model,
        opt,
        schedule,
        psi,
        balanced_class_weights(splits.train).to(device) if cfg.class_weights else None,
        refs,
    )
    if cfg.resume and has_state:
        load_resume(run)
        _log(f"resuming {out} after epoch {run.epochs_done} (step {run.global_step})", info)
    elif info.is_main:
        metrics_path(out).parent.mkdir(parents=True, exist_ok=True)
        metrics_path(out).write_text("")
    return run


def check_same_data(refs: dict[str, dict[str, str]], old: dict[str, dict[str, str]], cfg: TrainConfig) -> None:
    """Refuse to resume on a training (or typed validation) set whose content differs from
    the one the run started on: same digest kind, different value."""
    for role in ("data", "val_data") if cfg.val_data else ("data",):
        new, was = refs.get(role, {}), old.get(role, {})
        for key in ("sha256", "listing_sha256"):
            if key in new and key in was and new[key] != was[key]:
                raise BadParameterError(
                    f"--resume with different {role.replace('_', '-')}: {getattr(cfg, role)} has {key} "
                    f"{new[key][:12]}..., the run started on one with {was[key][:12]}...; "
                    "resume with the original data or train to a new --out"
                )


def train(cfg: TrainConfig) -> Run:
    """Train (or resume) the run ``cfg`` describes; returns the ``Run`` (on rank 0 with the
    final test and ARA metrics once every epoch is done). The process-wide torch settings
    the run needs (threads, flushing subnormals, deterministic algorithms) hold for the run
    only (``models.train.process``)."""
    with training_settings(threads=cfg.threads, deterministic=cfg.deterministic):
        run = prepare_run(cfg)
        try:
            train_epochs(run)
            if run.info.is_main and run.epochs_done >= cfg.epochs:
                finish(run)
        finally:
            if run.info.enabled and dist.is_initialized():
                dist.destroy_process_group()
    return run


def train_epochs(run: Run) -> None:
    """Train from ``run.epochs_done`` to the end (or ``stop_after`` epochs), checkpointing
    and logging after each epoch."""
    cfg, info = run.cfg, run.info
    log_path = metrics_path(cfg.out)
    if info.is_main:
        rewrite_metrics_log(log_path, run.epochs_done)
        tr = run.splits.train
        _log(
            f"training {cfg.arch} on {len(tr)} images {tr.in_channels}x{tr.input_size}x{tr.input_size} "
            f"({len(tr.classes)} classes, augment {run.aug_kind}) on {run.device}"
            f"{f' x{info.world} ranks' if info.enabled else ''}; val {run.splits.val_source or 'none'}; "
            f"test {run.splits.test_source or 'none'}; {run.schedule.steps_per_epoch} steps/epoch",
            info,
        )
    last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, run.epochs_done + cfg.stop_after)
    for epoch in range(run.epochs_done, last_epoch):
        t0 = time.perf_counter()
        record: dict[str, Any] = {"event": "epoch", "epoch": epoch + 1}
        record.update(train_one_epoch(run, epoch))
        average_buffers(run.net, info)
        if run.splits.val is not None:
            acc, n = evaluate(run.net, run.splits.val, run.device, info=info)
            record.update(val_accuracy=acc, val_n=n)
        record["seconds"] = time.perf_counter() - t0
        run.epochs_done = epoch + 1
        run.history.append(record)
        if info.is_main:
            append_metrics(log_path, record)
            _log(_epoch_line(record, cfg.epochs), info)
        save_run(run)
    if info.enabled:
        dist.barrier()  # rank 0 has written the last checkpoint
    if run.epochs_done < cfg.epochs:
        _log(f"stopped after epoch {run.epochs_done} of {cfg.epochs}; continue with --resume", info)


def finish(run: Run) -> None:
    """Final test accuracy and ARA (once), stored in both checkpoints and the log; rank 0."""
    if not run.final and run.splits.test is not None:
        run.final = final_metrics(run)
        append_metrics(metrics_path(run.cfg.out), {"event": "final", **run.final})
        save_run(run)
    if run.final:
        _log("final: " + ", ".join(f"{k} {_fmt(v)}" for k, v in run.final.items()), run.info)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"loss {r['loss']:.4f}", f"train acc {r['train_accuracy']:.4f}"]
    if r.get("psi") is not None:
        parts += [f"penalty {r['penalty']:.4f}", f"psi {r['psi']:.1f}"]
    if "val_accuracy" in r:
        parts.append(f"val acc {r['val_accuracy']:.4f}")
    parts += [f"{r['images_per_s']:.0f} img/s", f"{r['seconds']:.0f} s"]
    return ", ".join(parts)
