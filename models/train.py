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
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from aex.errors import BadParameterError, DataError, TrainingDivergedError

from .checkpoint import CheckpointMeta, load_tensors, read_metadata, save_checkpoint
from .data import ImageSet, load_dataset, seeded_subset
from .lr_schedule import SCHEDULES, LRSchedule
from .preprocess import AUGMENTATIONS, augment_batch, to_float
from .registry import CIFAR10_MEAN, CIFAR10_STD, available, create_model
from .robust import EPS_BETTER, EPS_WORSE, K_PSI, L_TARGET, PSI0, ZETA, Z, AdaptivePsi, input_gradient_penalty
from .train_state import (
    optimizer_from_tensors,
    optimizer_to_tensors,
    restore_rng,
    rng_tensors,
    step_generator,
)

ADV_MODES = {"l2": ("bounded", 0.01), "l2min": ("l2min", 0.1)}
# Fields that may change between a run and its resumption: where and how fast it runs, and
# what is measured at the end. Everything else must match, or the resumed run would not be
# the run that was started.
RUNTIME_FIELDS = frozenset(
    {"device", "workers", "threads", "progress", "resume", "overwrite", "download", "command",
     "ara_n", "ara_seed", "test_data", "val_n", "deterministic", "stop_after"}
)
CIFAR_PRESETS = {"resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar"}


@dataclass
class TrainConfig:
    """Every option of a training run (stored in the checkpoint's recipe)."""

    data: str
    arch: str
    out: str
    val_data: str | None = None
    test_data: str | None = None
    input_size: int | None = None
    in_channels: int | None = None
    depth: int | None = None
    width: int | None = None
    augment: str | None = None  # None: chosen by the data set's kind
    holdout: float = 0.1  # fraction held out when the data has neither val nor test split
    class_weights: str | None = None  # "balanced": CE weights N / (C * n_c) for skewed data
    # robust additions
    robust: bool = False
    psi0: float = PSI0
    k_psi: float = K_PSI
    l_target: float | None = None  # None: L_TARGET * ln(C) / ln(10), i.e. 1.5 for 10 classes
    eps_better: float = EPS_BETTER
    eps_worse: float = EPS_WORSE
    zeta: float = ZETA
    z: float = Z
    hhrelu_delta: float = 0.5
    # adversarial training
    adv_train: str | None = None  # "l2" | "l2min"
    adv_eps: float | None = None  # default per mode (0.01 / 0.1)
    adv_steps: int = 7
    # optimisation
    epochs: int = 200
    batch_size: int = 128  # per process
    lr: float = 0.1
    schedule: str = "step"
    milestones: list[int] | None = None
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    # evaluation
    val_n: int = 1000
    ara_n: int = 100
    ara_seed: int = 1776
    # runtime
    device: str | None = None
    workers: int = 0
    threads: int | None = None
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    download: bool = False
    deterministic: bool = False
    stop_after: int | None = None  # epochs to train in this invocation (then stop; --resume later)
    command: str = ""

    def __post_init__(self) -> None:
        self.milestones = sorted(int(m) for m in self.milestones) if self.milestones else None

    def validate(self) -> None:
        if self.arch not in available():
            raise BadParameterError(f"unknown architecture {self.arch!r}; available: {', '.join(available())}")
        if self.adv_train is not None and self.adv_train not in ADV_MODES:
            raise BadParameterError(f"--adv-train must be one of {', '.join(ADV_MODES)}, got {self.adv_train!r}")
        if self.schedule not in SCHEDULES:
            raise BadParameterError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.augment is not None and self.augment not in AUGMENTATIONS:
            raise BadParameterError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        for name in ("epochs", "batch_size", "adv_steps"):
            if getattr(self, name) < 1:
                raise BadParameterError(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0:
            raise BadParameterError("--lr must be > 0")
        if not 0 <= self.zeta <= 1:
            raise BadParameterError("--zeta must be in [0, 1]")
        if not 0 <= self.holdout < 1:
            raise BadParameterError("--holdout must be in [0, 1)")
        if self.hhrelu_delta <= 0:
            raise BadParameterError("--hhrelu-delta must be > 0")
        if self.class_weights not in (None, "balanced"):
            raise BadParameterError(f"--class-weights must be 'balanced' (or absent), got {self.class_weights!r}")
        if self.ara_n < 0 or self.workers < 0:
            raise BadParameterError("--ara-n and --workers must be >= 0")

    def recipe(self) -> dict[str, Any]:
        return asdict(self)


def differing_fields(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Names of training-relevant options on which two configs disagree."""
    return [f.name for f in fields(TrainConfig)
            if f.name not in RUNTIME_FIELDS | {"out"} and getattr(a, f.name) != getattr(b, f.name)]


def resume_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".resume.safetensors")


def metrics_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".metrics.jsonl")


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_buffers(net: nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over all ranks, so
    every rank ends the epoch with the same network."""
    if not info.enabled:
        return
    for buf in net.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(info.world)


def pick_device(name: str | None, info_local_rank: int = 0) -> torch.device:
    if name:
        dev = torch.device(name)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", info_local_rank)
    return dev


# --------------------------------------------------------------------------- data


@dataclass
class Splits:
    """train, val (per-epoch metric) and test (final metrics) sets, and where they came from."""

    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    val_source: str
    test_source: str


def _has_split(spec: str, split: str) -> bool:
    path = Path(spec)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return f"{split}_images" in z.files
    if path.is_dir():
        if (path / "cifar-10-batches-py").is_dir() or path.name == "cifar-10-batches-py":
            return split in ("train", "test")
        return (path / split).is_dir()
    if path.is_file():
        import tarfile

        try:
            with tarfile.open(path) as tf:
                for name in tf.getnames():
                    parts = name.lstrip("./").split("/")
                    if split in parts[:2] and len(parts) >= 3:
                        return True
        except (tarfile.TarError, OSError):
            return False
    return False


def _sibling(spec: str, split: str) -> str | None:
    """``.../train.tar`` -> ``.../test.tar`` (or val) when that file exists."""
    path = Path(spec)
    if "train" not in path.name:
        return None
    other = path.with_name(path.name.replace("train", split))
    return str(other) if other.exists() else None


def _load_split_of(spec: str, size, channels, download: bool, prefer=("val", "test", "train")) -> ImageSet:
    for split in prefer:
        if _has_split(spec, split):
            return load_dataset(spec, split, size, channels, download=download)
    return load_dataset(spec, prefer[-1], size, channels, download=download)


def default_input_shape(cfg: TrainConfig) -> tuple[int | None, int | None]:
    """(input_size, in_channels) the architecture wants, None where the data decides."""
    if cfg.arch in CIFAR_PRESETS:
        return cfg.input_size or 32, cfg.in_channels or 3
    if cfg.arch == "torchvision_resnet50":
        return cfg.input_size or 224, cfg.in_channels or 3
    return cfg.input_size, cfg.in_channels


def load_splits(cfg: TrainConfig) -> Splits:
    """Load train, val and test sets as the module docstring and ``TrainConfig`` describe.

    val: ``val_data``, else the data's own val split (MedMNIST), else a sibling ``val`` file,
    else a seeded ``val_n`` subset of the test set (CIFAR-10 has no val split), else a
    held-out fraction of the training set. test: ``test_data``, the data's test split, a
    sibling ``test`` file (``train.tar`` -> ``test.tar``), else the same held-out part.
    """
    size, channels = default_input_shape(cfg)
    train = load_dataset(cfg.data, "train", size, channels, download=cfg.download)
    size, channels = train.input_size, train.in_channels  # every split matches the train set

    def load(spec: str, prefer) -> ImageSet:
        s = _load_split_of(spec, size, channels, cfg.download, prefer)
        if s.classes != train.classes:
            raise DataError(f"{spec}: classes {s.classes} differ from the training set's {train.classes}")
        return s

    test, test_source = None, ""
    if cfg.test_data:
        test, test_source = load(cfg.test_data, ("test", "val", "train")), cfg.test_data
    elif _has_split(cfg.data, "test"):
        test, test_source = load_dataset(cfg.data, "test", size, channels, download=cfg.download), f"{cfg.data}:test"
    elif (sib := _sibling(cfg.data, "test")) is not None:
        test, test_source = load(sib, ("test", "val", "train")), sib

    val, val_source = None, ""
    if cfg.val_data:
        val, val_source = load(cfg.val_data, ("val", "test", "train")), cfg.val_data
    elif _has_split(cfg.data, "val"):
        val, val_source = load_dataset(cfg.data, "val", size, channels), f"{cfg.data}:val"
    elif (sib := _sibling(cfg.data, "val")) is not None:
        val, val_source = load(sib, ("val", "test", "train")), sib

    if val is None and test is None and cfg.holdout > 0 and len(train) >= 10:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
        n_hold = max(1, int(round(cfg.holdout * len(train))))
        held = train.subset(perm[:n_hold].sort().values)
        train = train.subset(perm[n_hold:].sort().values)
        val = test = held
        val_source = test_source = f"{cfg.data}:holdout({cfg.holdout})"
    if val is None and test is not None:
        # No val split (CIFAR-10): a fixed seeded subset of the test set, as a per-epoch
        # signal only; the reported test accuracy is over the whole test set.
        val = test.subset(seeded_subset(len(test), cfg.val_n, cfg.seed).sort().values)
        val_source = f"{test_source}[seeded {len(val)} of {len(test)}]"
    elif val is not None and cfg.val_n and len(val) > cfg.val_n:
        val = val.subset(seeded_subset(len(val), cfg.val_n, cfg.seed).sort().values)
        val_source += f"[seeded {len(val)}]"
    return Splits(train, val, test, val_source, test_source)


def balanced_class_weights(data: ImageSet) -> torch.Tensor:
    """N / (C * n_c) per class (1 everywhere for a balanced set); float32 C."""
    counts = torch.bincount(data.labels, minlength=len(data.classes)).double()
    if bool((counts == 0).any()):
        missing = [data.classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
        raise DataError(f"class(es) {missing} have no training images; cannot balance")
    return (counts.sum() / (len(counts) * counts)).float()


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images N x C x H x W, in [0, 1] units."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].to(torch.float64).div_(255.0)
        s += x.sum((0, 2, 3))
        s2 += x.pow(2).sum((0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-3), 6) for v in std]


def augmentation_kind(cfg: TrainConfig, train: ImageSet) -> str:
    return cfg.augment or train.kind


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


# --------------------------------------------------------------------------- batches


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, info: DistInfo) -> list[torch.Tensor]:
    """This rank's index batches for ``epoch``: DistributedSampler's shuffled, padded split
    (one process: a plain seeded permutation), cut into ``batch_size`` pieces. A last
    partial batch is dropped unless it is the only one."""
    sampler = DistributedSampler(range(n), num_replicas=info.world, rank=info.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), dtype=torch.int64)
    chunks = list(idx.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < batch_size:
        chunks.pop()
    return chunks


class EpochBatches(Dataset):
    """Item i = augmented batch i of one epoch: (float N x C x H x W in [0, 1], int64 N).

    Each batch draws from its own generator (``step_generator(seed, "augment", epoch, i,
    rank)``), so the result does not depend on the number of loader workers."""

    def __init__(self, data: ImageSet, chunks: list[torch.Tensor], kind: str, seed: int, epoch: int, rank: int):
        self.data, self.chunks, self.kind = data, chunks, kind
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.chunks[i]
        gen = step_generator(self.seed, "augment", self.epoch, i, self.rank)
        x = augment_batch(to_float(self.data.images[idx]), self.kind, gen)
        return x, self.data.labels[idx]


def iterate_batches(source: EpochBatches, workers: int):
    if workers <= 0:
        return (source[i] for i in range(len(source)))
    return iter(DataLoader(source, batch_size=None, shuffle=False, num_workers=workers))


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


# --------------------------------------------------------------------------- run state


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
        metrics["val_source"] = run.splits.val_source
    metrics.update(run.final)
    return CheckpointMeta(
        arch=run.cfg.arch,
        arch_args=run.arch_args,
        classes=list(train.classes),
        input_size=train.input_size,
        in_channels=train.in_channels,
        mean=list(run.arch_args["mean"]),
        std=list(run.arch_args["std"]),
        recipe=run.cfg.recipe(),
        psi_state=run.psi.state_dict() if run.psi is not None else None,
        metrics=metrics,
        extra=extra or {},
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
    save_checkpoint(resume_path(run.cfg.out), run.net, checkpoint_meta(run, {"resume": state}),
                    {**opt_tensors, **rng_tensors()})
    save_checkpoint(run.cfg.out, run.net, checkpoint_meta(run))


def load_resume(run: Run) -> None:
    """Restore weights, optimiser, psi, counters and RNG from the resume file."""
    path = resume_path(run.cfg.out)
    meta = read_metadata(path)
    tensors = load_tensors(path)
    state = meta.extra["resume"]
    net_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    run.net.load_state_dict(net_state, strict=True)
    optimizer_from_tensors(run.opt, tensors, state["optimizer"])
    if run.psi is not None and meta.psi_state is not None:
        run.psi.load_state_dict(meta.psi_state)
    restore_rng(tensors)
    run.epochs_done = int(state["epochs_done"])
    run.global_step = int(state["global_step"])
    run.history = list(state.get("history", []))
    if state.get("finished"):
        run.final = {k: v for k, v in meta.metrics.items()
                     if k.startswith(("test_", "ara_", "final_"))}


def stored_config(out: str | os.PathLike) -> TrainConfig | None:
    """The config a previous run at ``out`` was started with (None if there is none)."""
    path = resume_path(out)
    if not path.is_file():
        return None
    recipe = read_metadata(path).recipe
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in recipe.items() if k in known})


def _rewrite_metrics_log(path: Path, epochs_done: int) -> None:
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


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
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
        _rewrite_metrics_log(log_path, run.epochs_done)
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
            _append_metrics(log_path, record)
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
        _append_metrics(metrics_path(run.cfg.out), {"event": "final", **run.final})
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
