"""The options of a training run: ``TrainConfig`` (validated, and stored whole in the
checkpoint's recipe), which options a resumed run may change, and the files a run writes
beside its ``out`` checkpoint (``<stem>.resume.safetensors``, ``<stem>.metrics.jsonl``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from models.data.augment import AUGMENTATIONS
from models.defaults import ARA_SEED, EPS_BETTER, EPS_WORSE, HHRELU_DELTA, K_PSI, PSI0, ZETA, Z
from models.errors import BadParameterError
from models.nn.registry import available
from models.train.schedules import SCHEDULES

ADV_MODES = {"l2": ("bounded", 0.01), "l2min": ("l2min", 0.1)}
# Fields that may change between a run and its resumption: where and how fast it runs, and
# what is measured at the end. Everything else must match, or the resumed run would not be
# the run that was started.
RUNTIME_FIELDS = frozenset(
    {
        "device",
        "workers",
        "threads",
        "progress",
        "resume",
        "overwrite",
        "download",
        "command",
        "ara_n",
        "ara_seed",
        "test_data",
        "val_n",
        "deterministic",
        "stop_after",
    }
)


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
    hhrelu_delta: float = HHRELU_DELTA
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
    ara_seed: int = ARA_SEED
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
    return [
        f.name
        for f in fields(TrainConfig)
        if f.name not in RUNTIME_FIELDS | {"out"} and getattr(a, f.name) != getattr(b, f.name)
    ]


def resume_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".resume.safetensors")


def metrics_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".metrics.jsonl")
