"""The trainer's data: the train / val / test splits of a run (``load_splits``), what is
derived from the training set (balanced class weights, per-channel statistics, the
augmentation kind), and the batches of one epoch (this rank's shuffled index batches,
augmented per batch from the step's own generator).

Data sets are decoded once into uint8 tensors (``models.data.datasets``); batches are sliced from
them and augmented as whole tensors (``models.data.augment``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from models.data.augment import augment_batch
from models.data.datasets import ImageSet, load_dataset
from models.data.sources import data_reference
from models.data.splits import seeded_subset
from models.data.tensors import to_float
from models.errors import DataError
from models.train.config import TrainConfig
from models.train.distributed import DistInfo
from models.train.state import step_generator

CIFAR_PRESETS = {"resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar"}


# --------------------------------------------------------------------------- splits


@dataclass
class Splits:
    """train, val (per-epoch metric) and test (final metrics) sets, and where they came from:
    ``*_source`` describes the split (``<file>:test``, ...), ``*_file`` is the data set it was
    read from ("" for none)."""

    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    val_source: str
    test_source: str
    val_file: str = ""
    test_file: str = ""


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

    test, test_source, test_file = None, "", ""
    if cfg.test_data:
        test, test_source = load(cfg.test_data, ("test", "val", "train")), cfg.test_data
        test_file = cfg.test_data
    elif _has_split(cfg.data, "test"):
        test, test_source = load_dataset(cfg.data, "test", size, channels, download=cfg.download), f"{cfg.data}:test"
        test_file = cfg.data
    elif (sib := _sibling(cfg.data, "test")) is not None:
        test, test_source, test_file = load(sib, ("test", "val", "train")), sib, sib

    val, val_source, val_file = None, "", ""
    if cfg.val_data:
        val, val_source, val_file = load(cfg.val_data, ("val", "test", "train")), cfg.val_data, cfg.val_data
    elif _has_split(cfg.data, "val"):
        val, val_source, val_file = load_dataset(cfg.data, "val", size, channels), f"{cfg.data}:val", cfg.data
    elif (sib := _sibling(cfg.data, "val")) is not None:
        val, val_source, val_file = load(sib, ("val", "test", "train")), sib, sib

    if val is None and test is None and cfg.holdout > 0 and len(train) >= 10:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
        n_hold = max(1, int(round(cfg.holdout * len(train))))
        held = train.subset(perm[:n_hold].sort().values)
        train = train.subset(perm[n_hold:].sort().values)
        val = test = held
        val_source = test_source = f"{cfg.data}:holdout({cfg.holdout})"
        val_file = test_file = cfg.data
    if val is None and test is not None:
        # No val split (CIFAR-10): a fixed seeded subset of the test set, as a per-epoch
        # signal only; the reported test accuracy is over the whole test set.
        val = test.subset(seeded_subset(len(test), cfg.val_n, cfg.seed).sort().values)
        val_source, val_file = f"{test_source}[seeded {len(val)} of {len(test)}]", test_file
    elif val is not None and cfg.val_n and len(val) > cfg.val_n:
        val = val.subset(seeded_subset(len(val), cfg.val_n, cfg.seed).sort().values)
        val_source += f"[seeded {len(val)}]"
    return Splits(train, val, test, val_source, test_source, val_file, test_file)


def data_refs(cfg: TrainConfig, splits: Splits) -> dict[str, dict[str, str]]:
    """``data_reference`` of every data set the run reads, by role: ``data`` (training set),
    and ``val_data`` / ``test_data`` where that split came from another file."""
    refs = {"data": data_reference(cfg.data)}
    for role, file in (("val_data", splits.val_file), ("test_data", splits.test_file)):
        if file and file != cfg.data:
            refs[role] = data_reference(file)
    return refs


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
        x = images[i : i + chunk].to(torch.float64).div_(255.0)
        s += x.sum((0, 2, 3))
        s2 += x.pow(2).sum((0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-3), 6) for v in std]


def augmentation_kind(cfg: TrainConfig, train: ImageSet) -> str:
    return cfg.augment or train.kind


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
