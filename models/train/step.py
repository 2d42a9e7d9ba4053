"""One training step and one epoch: the network and optimiser a run starts from, the
adversarial examples of ``adv_train``, the cross-entropy plus the robust penalty with the
adaptive psi, and the epoch loop over the run's batches."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.data.datasets import ImageSet
from models.defaults import L_TARGET
from models.errors import BadParameterError, TrainingDivergedError
from models.nn.registry import CIFAR10_MEAN, CIFAR10_STD, create_model
from models.train.config import ADV_MODES, TrainConfig
from models.train.data import EpochBatches, channel_stats, epoch_batches, iterate_batches
from models.train.distributed import DistInfo, all_reduce_sum
from models.train.penalty import AdaptivePsi, input_gradient_penalty
from models.train.run import Run
from models.train.state import step_generator


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


def adversarial_examples(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, affected: torch.Tensor
) -> torch.Tensor:
    """x + delta from the perturbation engine (bounded or l2min, S=adv_steps, k=1, mu=0, no
    bound check); the engine runs the network in eval mode and restores its mode."""
    from models.perturb.engine import perturbation_search  # the engine shared with ARA and explanations

    mode, default_eps = ADV_MODES[cfg.adv_train]
    result = perturbation_search(
        net,
        x,
        y,
        mode=mode,
        steps=cfg.adv_steps,
        eps=cfg.adv_eps or default_eps,
        overshoot=1.0,
        momentum=0.0,
        affected=affected,
        bound_check=False,
        with_logits_after=False,
    )
    return (x + result.delta).detach()


@dataclass
class StepStats:
    n: int = 0
    ce_sum: float = 0.0
    penalty_sum: float = 0.0
    correct: int = 0


def train_step(
    model: nn.Module,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    psi: AdaptivePsi | None,
    lr: float,
    gen: torch.Generator,
    info: DistInfo,
    class_weight: torch.Tensor | None = None,
) -> tuple[float, float, int]:
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
        ce, pen, correct = train_step(
            run.model, run.net, run.opt, x, y, cfg, run.psi, run.schedule(run.global_step), gen, info, run.class_weight
        )
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
        torch.tensor([stats.n, stats.ce_sum, stats.penalty_sum, stats.correct], dtype=torch.float64), info
    )
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


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # In a log file (nohup), a line every 30 s instead of ten a second.
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        file=sys.stderr,
        unit="batch",
        dynamic_ncols=interactive,
        leave=False,
        mininterval=0.5 if interactive else 30.0,
    )
