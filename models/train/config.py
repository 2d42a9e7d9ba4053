"""The options of a training run: ``TrainConfig`` (validated, and stored whole in the
checkpoint's recipe), which options a resumed run may change, the files a run writes
beside its ``out`` checkpoint (``<stem>.resume.safetensors``, ``<stem>.metrics.jsonl``),
and how paths are recorded in a checkpoint.

A checkpoint never holds a path of the machine that trained it: a path is recorded as
typed when it is relative and stays inside the working directory, else by its last
component (the data set's file or folder name); every data set read is recorded with its
sha256 as well (``data_reference``), and the command line with its path arguments
rewritten the same way (``portable_command``)."""

from __future__ import annotations

import os
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from models.data.augment import AUGMENTATIONS
from models.data.sources import portable_path
from models.defaults import ARA_SEED, EPS_BETTER, EPS_WORSE, HHRELU_DELTA, K_PSI, PSI0, ZETA, Z
from models.dicom.class_codes import parse_assignment
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
        "class_code",
    }
)


@dataclass
class TrainConfig:
    """Every option of a training run (stored in the checkpoint's recipe, paths recorded as
    ``portable_recipe`` says)."""

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
    # NAME=SCHEME:VALUE:MEANING: the standard concept of a class (models.dicom.class_codes)
    class_code: list[str] | None = None
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
        for text in self.class_code or []:
            parse_assignment(text)  # the grammar and the scheme now; the class once the data is read

    def recipe(self) -> dict[str, Any]:
        """Every option as given (``portable_recipe``: as a checkpoint records them)."""
        return asdict(self)


# Options that name data sets (recorded through ``data_reference``).
DATA_FIELDS = ("data", "val_data", "test_data")


def differing_fields(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Names of training-relevant options on which two configs disagree.

    Data sets are compared by name (``Path(portable_path(p)).name``): a checkpoint records
    an absolute path by its name only, so the same file typed as another path matches here,
    and its content is compared by sha256 separately (``data_reference``)."""

    def same(name: str, x: Any, y: Any) -> bool:
        if name in DATA_FIELDS and x and y:
            return x == y or Path(portable_path(x)).name == Path(portable_path(y)).name
        return x == y

    return [
        f.name
        for f in fields(TrainConfig)
        if f.name not in RUNTIME_FIELDS | {"out"} and not same(f.name, getattr(a, f.name), getattr(b, f.name))
    ]


# --------------------------------------------------------------------------- recorded paths


def _portable_arg(arg: str) -> str:
    if arg.startswith("-") and "=" in arg:
        opt, value = arg.split("=", 1)
        return f"{opt}={_portable_arg(value)}"
    if os.sep in arg or arg.startswith("~") or arg == os.pardir:
        return portable_path(arg)  # a relative path inside the working directory stays as typed
    return arg


def portable_command(command: str) -> str:
    """The typed command line with every path argument recorded as ``portable_path`` does
    (absolute, home-relative or climbing paths become their last component)."""
    if not command:
        return command
    try:
        return shlex.join(_portable_arg(a) for a in shlex.split(command))
    except ValueError:  # unbalanced quotes: rewrite whitespace-separated words
        return " ".join(_portable_arg(a) for a in command.split())


def portable_recipe(cfg: TrainConfig, data_refs: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """The recipe a checkpoint stores: ``cfg.recipe()`` with its data sets, ``out`` and
    ``command`` recorded without paths of this machine, plus ``data_refs``: role (``data``,
    ``val_data``, ``test_data``) -> ``data_reference`` of each file the run read."""
    recipe = cfg.recipe()
    for name in (*DATA_FIELDS, "out"):
        if recipe[name]:
            recipe[name] = portable_path(recipe[name])
    recipe["command"] = portable_command(recipe["command"])
    recipe["data_refs"] = dict(data_refs or {})
    return recipe


def resume_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".resume.safetensors")


def metrics_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".metrics.jsonl")
