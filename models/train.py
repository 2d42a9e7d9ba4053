"""The offline trainer behind ``aex train``: plain functions (load data, build the network,
train one epoch, evaluate, save) and one ``train(config)`` that strings them together.

- Standard training, or ``robust``: HHReLU, no zero-init of the residual branches, and the
  Lipschitz-inspired input-gradient penalty with tandem zeta and adaptive psi
  (``models.robust``).
- ``adv_train`` ``l2`` (bounded, eps 0.01) or ``l2min`` (eps 0.1): each batch is replaced by
  perturbed images from the perturbation engine (S=7, k=1, mu=0, no bound check, network in
  eval mode while it searches); with ``robust`` only a random half of each batch is perturbed.
- Data sets are decoded once into uint8 tensors (``models.data``); batches are sliced from
  them and augmented as whole tensors (``models.preprocess.augment_batch``).
- At the end of every epoch the run is checkpointed atomically: ``<out>`` (the served
  checkpoint: weights and metadata only) and ``<stem>.resume.safetensors`` (weights,
  optimiser momentum, psi state, epoch and step counters, global RNG state), and one JSON
  line is appended to ``<stem>.metrics.jsonl``. ``resume`` continues bit-identically.
- Under ``torchrun`` (``WORLD_SIZE`` > 1) the same code trains with DistributedDataParallel:
  the epoch's permutation is split by ``DistributedSampler``, the cross-entropy that drives
  psi is averaged over all ranks (so every rank holds the same psi), BatchNorm running
  statistics are averaged at the end of each epoch, and only rank 0 writes files.

The pieces live beside this module: ``train_config`` (the options), ``distributed`` (DDP
helpers), ``train_data`` (splits and epoch batches) and ``train_run`` (run state, checkpoint
and resume). This module builds the network, trains and evaluates, and re-exports the
names callers import from ``models.train``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from aex.errors import BadParameterError, TrainingDivergedError

from .data import ImageSet, seeded_subset
from .distributed import DistInfo, all_reduce_sum, average_buffers, init_distributed, rank_device
from .lr_schedule import LRSchedule
from .preprocess import to_float
from .registry import CIFAR10_MEAN, CIFAR10_STD, create_model
from .runtime import full_precision
from .robust import L_TARGET, AdaptivePsi, input_gradient_penalty
from .train_config import ADV_MODES, RUNTIME_FIELDS, TrainConfig, differing_fields, metrics_path, resume_path
from .train_data import (
    CIFAR_PRESETS,
    EpochBatches,
    Splits,
    augmentation_kind,
    balanced_class_weights,
    channel_stats,
    default_input_shape,
    epoch_batches,
    iterate_batches,
    load_splits,
)
from .train_run import (
    Run,
    append_metrics,
    checkpoint_meta,
    load_resume,
    rewrite_metrics_log,
    save_run,
    stored_config,
)
from .train_state import step_generator

# Names that were defined here before the trainer was split, and that callers import (or
# tests monkeypatch) as ``models.train.<name>``.
__all__ = [
    "ADV_MODES", "CIFAR_PRESETS", "RUNTIME_FIELDS", "DistInfo", "EpochBatches", "Run", "Splits",
    "StepStats", "TrainConfig", "adversarial_examples", "all_reduce_sum", "ara_metrics",
    "arch_args_for", "augmentation_kind", "average_buffers", "balanced_class_weights",
    "build_model", "build_optimizer", "channel_stats", "checkpoint_meta", "class_accuracy",
    "default_input_shape", "differing_fields", "epoch_batches", "evaluate", "final_metrics",
    "finish", "init_distributed", "iterate_batches", "load_resume", "load_splits", "loss_target",
    "metrics_path", "prepare_run", "resume_path", "save_run", "stored_config", "train",
    "train_epochs", "train_one_epoch", "train_step",
]

# --------------------------------------------------------------------------- model


def arch_args_for(cfg: TrainConfig, train: ImageSet) -> dict[str, Any]:
    """Arguments for ``create_model`` (stored in the checkpoint)."""
    if train.kind == "cifar10" and train.in_channels == 3:
        mean, std = list(CIFAR10_MEAN), list(CIFAR10_STD)
    else:
        mean, std = channel_stats(train.images)
    args: dict[str, Any] = dict(
        num_classes=len(train.classes),
        in_channels=train.in_channels,
        input_size=train.input_size,
        activation="hhrelu" if cfg.robust else "relu",
        hhrelu_delta=cfg.hhrelu_delta,
        mean=mean,
        std=std,
    )
    if cfg.arch != "torchvision_resnet50":
        # The reference zero-inits every block's last conv for standard networks only
        # ("no output zeroing" is one of the robust additions).
        args["zero_init_residual"] = not cfg.robust
        if cfg.depth is not None:
            args["depth"] = cfg.depth
        if cfg.width is not None:
            args["width"] = cfg.width
    return args


def build_model(cfg: TrainConfig, arch_args: dict[str, Any]) -> nn.Module:
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    try:
        return create_model(cfg.arch, **arch_args)
    except ValueError as exc:
        raise BadParameterError(f"cannot build {cfg.arch}: {exc}") from None


def loss_target(l_target: float | None, num_classes: int) -> float:
    """The CE that adaptive psi steers toward. The reference's 1.5 is for CIFAR-10, where
    chance is ln 10 = 2.30; by default it scales with ln C, so that on two classes (chance
    0.69) psi does not grow until the network is worse than a constant guess."""
    if l_target is not None:
        return float(l_target)
    return L_TARGET * math.log(num_classes) / math.log(10)


def build_optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    # The reference decays every parameter (BatchNorm included).
    return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- one step / epoch


def adversarial_examples(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                         affected: torch.Tensor) -> torch.Tensor:
    """x + delta from the perturbation engine (bounded or l2min, S=adv_steps, k=1, mu=0, no
    bound check); the engine runs the network in eval mode and restores its mode."""
    from .perturb import perturbation_search  # the engine shared with ARA and explanations

    mode, default_eps = ADV_MODES[cfg.adv_train]
    result = perturbation_search(net, x, y, mode=mode, steps=cfg.adv_steps, eps=cfg.adv_eps or default_eps,
                                 overshoot=1.0, momentum=0.0, affected=affected, bound_check=False,
                                 with_logits_after=False)
    return (x + result.delta).detach()


@dataclass
class StepStats:
    n: int = 0
    ce_sum: float = 0.0
    penalty_sum: float = 0.0
    correct: int = 0


def train_step(model: nn.Module, net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               cfg: TrainConfig, psi: AdaptivePsi | None, lr: float, gen: torch.Generator,
               info: DistInfo, class_weight: torch.Tensor | None = None) -> tuple[float, float, int]:
    """One optimisation step. ``model`` may be the DDP wrapper of ``net``. Returns (global mean
    CE, penalty, correct count on this rank). ``gen`` supplies this step's randomness
    (half-and-half mask, penalty logits)."""
    if cfg.adv_train:
        n = x.shape[0]
        if cfg.robust:  # half-and-half: only a random half of the batch is perturbed
            affected = (torch.rand(n, generator=gen) < 0.5).to(x.device, x.dtype)
        else:
            affected = torch.ones(n, device=x.device, dtype=x.dtype)
        x = adversarial_examples(net, x, y, cfg, affected)
    if cfg.robust:
        x.requires_grad_(True)
    logits = model(x)
    ce = F.cross_entropy(logits, y, weight=class_weight)
    ce_global = all_reduce_sum(ce.detach().clone(), info) / info.world
    ce_value = float(ce_global)
    if not math.isfinite(ce_value):
        raise TrainingDivergedError(f"cross-entropy became {ce_value}; lower --lr (or the psi constants)")
    loss = ce
    pen_value = 0.0
    if cfg.robust:
        # psi is updated before the penalty, from the CE averaged over every rank.
        psi_now = psi.update(ce_value)
        pen = input_gradient_penalty(x, logits, y, psi_now, cfg.zeta, cfg.z, gen)
        loss = ce + pen
        pen_value = float(pen.detach())
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    correct = int((logits.detach().argmax(1) == y).sum())
    return ce_value, pen_value, correct


def train_one_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Train ``run`` for one epoch; returns the epoch's metrics (averaged over all ranks)."""
    cfg, info = run.cfg, run.info
    run.model.train()
    chunks = epoch_batches(len(run.splits.train), cfg.batch_size, epoch, cfg.seed, info)
    source = EpochBatches(run.splits.train, chunks, run.aug_kind, cfg.seed, epoch, info.rank)
    bar = _progress(len(chunks), f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and info.is_main)
    stats = StepStats()
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(iterate_batches(source, cfg.workers)):
        x = x.to(run.device, non_blocking=True)
        y = y.to(run.device, non_blocking=True)
        gen = step_generator(cfg.seed, "step", epoch, i, info.rank)
        ce, pen, correct = train_step(run.model, run.net, run.opt, x, y, cfg, run.psi,
                                      run.schedule(run.global_step), gen, info, run.class_weight)
        run.global_step += 1
        stats.n += y.shape[0]
        stats.ce_sum += ce * y.shape[0]
        stats.penalty_sum += pen * y.shape[0]
        stats.correct += correct
        if bar is not None:
            rate = stats.n * info.world / max(time.perf_counter() - t0, 1e-9)
            post = {"loss": f"{ce:.3f}", "img/s": f"{rate:.0f}"}
            if run.psi is not None:
                post["psi"] = f"{run.psi.psi:.0f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    totals = all_reduce_sum(
        torch.tensor([stats.n, stats.ce_sum, stats.penalty_sum, stats.correct], dtype=torch.float64), info)
    n = max(float(totals[0]), 1.0)
    return {
        "loss": float(totals[1]) / n,
        "penalty": float(totals[2]) / n,
        "psi": run.psi.psi if run.psi is not None else None,
        "train_accuracy": float(totals[3]) / n,
        "lr": run.schedule(max(run.global_step - 1, 0)),
        "images": int(totals[0]),
        "images_per_s": float(totals[0]) / max(seconds, 1e-9),
    }


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(net: nn.Module, data: ImageSet, device: torch.device, batch_size: int = 256,
             info: DistInfo | None = None) -> tuple[float, int]:
    """Accuracy of ``net`` (eval mode) on ``data``; with ``info`` each rank takes every
    world-th image and the counts are summed. Returns (accuracy, n)."""
    info = info or DistInfo()
    was_training = net.training
    net.eval()
    idx = torch.arange(len(data))[info.rank::info.world]
    correct = 0
    for chunk in idx.split(batch_size):
        x = to_float(data.images[chunk]).to(device)
        correct += int((net(x).argmax(1).cpu() == data.labels[chunk]).sum())
    totals = all_reduce_sum(torch.tensor([correct, idx.numel()], dtype=torch.float64), info)
    net.train(was_training)
    n = int(totals[1])
    return float(totals[0]) / max(n, 1), n


@torch.no_grad()
def class_accuracy(net: nn.Module, data: ImageSet, device: torch.device, batch_size: int = 256) -> list[float]:
    """Recall of each class (accuracy over its images; NaN-free: 0 for an absent class)."""
    was_training = net.training
    net.eval()
    preds = torch.cat([net(to_float(data.images[i:i + batch_size]).to(device)).argmax(1).cpu()
                       for i in range(0, len(data), batch_size)])
    net.train(was_training)
    out = []
    for c in range(len(data.classes)):
        sel = data.labels == c
        out.append(float((preds[sel] == c).double().mean()) if bool(sel.any()) else 0.0)
    return out


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
    out.update(test_accuracy=acc, test_n=n, test_source=run.splits.test_source,
               test_class_accuracy=class_accuracy(run.net, test, run.device))
    if cfg.ara_n > 0:
        # The ARA bar ticks ten times a second: only on a terminal, not into a log file.
        out.update(ara_metrics(run.net, test, cfg.ara_n, cfg.ara_seed, cfg.progress and sys.stderr.isatty()))
    out["final_eval_seconds"] = time.perf_counter() - t0
    return out


def ara_metrics(net: nn.Module, test: ImageSet, n: int, seed: int, progress: bool = False) -> dict[str, Any]:
    """Attack and BTR ARA on the seeded subset (the shared subset rule) of ``test``.

    The reference checks that every search settles in its first half; if one does not, the
    figures are still computed (and flagged) rather than losing the end of a long run."""
    from aex.errors import BoundNotReachedError

    from .ara import compute_ara  # shared with `aex evaluate`

    idx = seeded_subset(len(test), n, seed)
    images, labels = test.images[idx], test.labels[idx]
    bound_ok = True
    try:
        res = compute_ara(net, images, labels, progress=progress)
    except BoundNotReachedError as exc:
        print(f"warning: {exc}; computing ARA without the bound check", file=sys.stderr)
        bound_ok = False
        res = compute_ara(net, images, labels, progress=progress, bound_check=False)
    return {
        "ara_attack": res.attack_ara,
        "ara_btr": res.btr_ara,
        "ara_accuracy": res.accuracy,
        "ara_n": res.n,
        "ara_seed": seed,
        "ara_settings": res.settings,
        "ara_bound_check_passed": bound_ok,
        # Per-image radii: the stability score ranks single images against them.
        "ara_radii": res.radii_record(test.source, seed),
    }


# --------------------------------------------------------------------------- progress and log


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # In a log file (nohup), a line every 30 s instead of ten a second.
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, file=sys.stderr, unit="batch", dynamic_ncols=interactive,
                leave=False, mininterval=0.5 if interactive else 30.0)


def _log(msg: str, info: DistInfo) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the command


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
            raise BadParameterError(f"--resume with different training options ({detail}); "
                                    "resume with the original options or train to a new --out")
    elif (out.exists() or has_state) and not cfg.overwrite:
        if cfg.resume:
            raise BadParameterError(f"{out} exists but there is no resume state beside it "
                                    f"({resume_path(out).name}); pass --overwrite to start over")
        raise BadParameterError(f"{out} already exists: pass --resume to continue it or --overwrite to start over")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Subnormal floats (tiny gradients late in a schedule) slow x86 CPUs several-fold.
    torch.set_flush_denormal(True)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = rank_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = init_distributed(device)

    splits = load_splits(cfg)
    arch_args = arch_args_for(cfg, splits.train)
    net = build_model(cfg, arch_args).to(device)
    model: nn.Module = net
    if info.enabled:
        # BatchNorm buffers stay per rank during the epoch and are averaged at its end.
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    opt = build_optimizer(cfg, net)
    steps = len(epoch_batches(len(splits.train), cfg.batch_size, 0, cfg.seed, info))
    schedule = LRSchedule(cfg.schedule, cfg.lr, cfg.epochs, steps, list(cfg.milestones or []), cfg.warmup_epochs)
    psi = None
    if cfg.robust:
        psi = AdaptivePsi(cfg.psi0, cfg.k_psi, loss_target(cfg.l_target, len(splits.train.classes)),
                          cfg.eps_better, cfg.eps_worse)
    run = Run(cfg, info, device, splits, augmentation_kind(cfg, splits.train), arch_args, net, model, opt,
              schedule, psi, balanced_class_weights(splits.train).to(device) if cfg.class_weights else None)
    if cfg.resume and has_state:
        load_resume(run)
        _log(f"resuming {out} after epoch {run.epochs_done} (step {run.global_step})", info)
    elif info.is_main:
        metrics_path(out).parent.mkdir(parents=True, exist_ok=True)
        metrics_path(out).write_text("")
    return run


def train(cfg: TrainConfig) -> Run:
    """Train (or resume) the run ``cfg`` describes; returns the ``Run`` (on rank 0 with the
    final test and ARA metrics once every epoch is done)."""
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
        _log(f"training {cfg.arch} on {len(tr)} images {tr.in_channels}x{tr.input_size}x{tr.input_size} "
             f"({len(tr.classes)} classes, augment {run.aug_kind}) on {run.device}"
             f"{f' x{info.world} ranks' if info.enabled else ''}; val {run.splits.val_source or 'none'}; "
             f"test {run.splits.test_source or 'none'}; {run.schedule.steps_per_epoch} steps/epoch", info)
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
