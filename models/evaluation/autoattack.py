"""AutoAttack robust accuracy of a classifier under an L2 budget (Croce and Hein 2020), run by
the maintained ``pyautoattack`` package (the authors' fra31/auto-attack code), so the figures
compare with RobustBench's.

The budget is stated per data set by its RMS: RobustBench's CIFAR-10 L2 budget eps = 0.5 on
3 x 32 x 32 inputs in [0, 1] is an RMS of 0.5 / sqrt(3072) ~ 0.009 (``AUTOATTACK_RMS``); an
input of C x H x W gets eps = RMS x sqrt(C H W) (0.2526 on PneumoniaMNIST's 1 x 28 x 28).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.defaults import AUTOATTACK_ATTACKS, AUTOATTACK_RMS
from models.errors import BadParameterError
from models.nn.runtime import eval_mode, model_device

KNOWN_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS = ("standard", "plus", "rand")
MAX_TARGETS = 9  # target classes of apgd-t and fab-t in AutoAttack's standard version


def l2_eps(shape: tuple[int, ...] | torch.Size, rms: float = AUTOATTACK_RMS) -> float:
    """The L2 budget of one input of ``shape`` (C x H x W) with the given RMS."""
    return float(rms) * math.sqrt(math.prod(int(s) for s in shape))


def parse_attacks(spec: str) -> tuple[str, list[str] | None]:
    """(version, attacks): "standard" (also "plus", "rand") is AutoAttack's own version, whose
    attacks it chooses; a list joined by commas ("apgd-ce,apgd-t") runs those, in that order,
    as version "custom"."""
    spec = spec.strip().lower()
    if spec in VERSIONS:
        return spec, None
    attacks = [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in KNOWN_ATTACKS]
    if not attacks or unknown:
        raise BadParameterError(
            f"AutoAttack attacks must be one of {', '.join(VERSIONS)} or a list of {', '.join(KNOWN_ATTACKS)}; "
            f"got {spec!r}"
        )
    return "custom", list(dict.fromkeys(attacks))


@dataclass
class AutoAttackResult:
    """clean / robust accuracy over n images; robust counts an image correct only when every
    attack that ran left it correct within eps. settings: what ran (package and its version,
    norm, eps, its RMS, version, attacks, seed, target classes)."""

    clean_accuracy: float
    robust_accuracy: float
    n: int
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def metrics_record(self, data: str, seed: int) -> dict[str, Any]:
        """The figures as a checkpoint's ``metrics`` store them (``aex evaluate --autoattack
        --record``). data: how the data set is named (no machine path); seed: of the subset."""
        return {
            "autoattack_accuracy": self.robust_accuracy,
            "autoattack_clean_accuracy": self.clean_accuracy,
            "autoattack_n": self.n,
            "autoattack_seed": seed,
            "autoattack_data": data,
            "autoattack_settings": dict(self.settings),
        }


def autoattack_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    attacks: str = AUTOATTACK_ATTACKS,
    rms: float = AUTOATTACK_RMS,
    seed: int = 0,
    batch_size: int = 100,
) -> AutoAttackResult:
    """Robust accuracy of ``model`` under AutoAttack in L2 at eps = ``l2_eps(image shape, rms)``.

    images: uint8 N x C x H x W in [0, 255] or float in [0, 1]; labels: N int64. attacks: see
    ``parse_attacks``. The attacks' own seeds are ``seed`` (so a run repeats). apgd-t and fab-t
    aim at min(9, C - 1) target classes; the DLR losses (apgd-dlr, apgd-t) need at least 3 and
    4 classes, so on fewer a request for them is refused rather than run wrongly. The adversarial
    images are checked: inside [0, 1], within eps (1e-4 slack for float rounding), and the
    robust accuracy is recounted from the model's own predictions on them."""
    from importlib.metadata import version as package_version

    from pyautoattack import AutoAttack  # only where AutoAttack runs

    version, chosen = parse_attacks(attacks)
    device = model_device(model)
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    x, y = x.to(device), labels.to(device).long()
    n_classes = _num_classes(model, x[:1])
    wanted = chosen or (["apgd-ce", "apgd-t", "fab-t", "square"] if version == "standard" else [])
    if n_classes < 4 and any(a in ("apgd-t", "apgd-dlr") for a in wanted):
        raise BadParameterError(
            f"the DLR losses of apgd-t and apgd-dlr need at least 4 and 3 classes; this model has {n_classes}: "
            "name the attacks (e.g. apgd-ce)"
        )
    eps = l2_eps(tuple(x.shape[1:]), rms)
    targets = min(MAX_TARGETS, n_classes - 1)
    t0 = time.perf_counter()
    with eval_mode(model):
        adversary = AutoAttack(
            model, norm="L2", eps=eps, version=version, attacks=chosen, seed=int(seed), device=device
        )
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_target_classes = targets
        adversary.logger.setLevel(logging.WARNING)
        ran = list(adversary.attacks_to_run)
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        with torch.no_grad():
            clean = _predict(model, x, batch_size).eq(y)
            robust = _predict(model, x_adv, batch_size).eq(y) & clean
    norms = (x_adv - x).flatten(1).norm(dim=1)
    if float(norms.max()) > eps + 1e-4 or float(x_adv.min()) < 0.0 or float(x_adv.max()) > 1.0:
        raise BadParameterError("AutoAttack returned images outside the budget or outside [0, 1]")
    settings = {
        "package": f"pyautoattack {package_version('pyautoattack')}",
        "norm": "L2",
        "eps": eps,
        "eps_rms": float(rms),
        "version": version,
        "attacks": ran,
        "target_classes": targets,
        "seed": int(seed),
    }
    return AutoAttackResult(
        clean_accuracy=float(clean.double().mean()),
        robust_accuracy=float(robust.double().mean()),
        n=int(y.numel()),
        settings=settings,
        seconds=time.perf_counter() - t0,
    )


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with eval_mode(model), torch.no_grad():
        return int(model(x).shape[1])


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])
