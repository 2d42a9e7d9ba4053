"""Learning-rate schedules as pure functions of the global step.

A schedule object keeps no state of its own: the learning rate of step t is a function of t
(and the fixed plan), so resuming a run needs only the step counter, and every rank of a
distributed run computes the same rate.

- ``step``: the reference recipe; the rate is divided by 10 at each milestone epoch
  (170 and 195 of 200 in the reference; by default 85% and 97.5% of the epochs).
- ``cosine``: optional linear warm-up, then half a cosine from ``lr`` down to 0.
- ``onecycle``: Smith's one-cycle as in ``torch.optim.lr_scheduler.OneCycleLR`` (cosine up
  from lr/25 to lr over the first 30% of steps, cosine down to lr/25/1e4); momentum is not
  cycled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from models.errors import BadParameterError

SCHEDULES = ("step", "cosine", "onecycle")


def default_milestones(epochs: int) -> list[int]:
    """The reference's 170/195 of 200 scaled to ``epochs``."""
    return sorted({max(1, round(0.85 * epochs)), max(1, round(0.975 * epochs))})


def _cos_anneal(start: float, end: float, frac: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, frac))))


@dataclass
class LRSchedule:
    name: str
    lr: float
    epochs: int
    steps_per_epoch: int
    milestones: list[int] = field(default_factory=list)
    warmup_epochs: float = 0.0
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise BadParameterError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.name!r}")
        if self.steps_per_epoch < 1 or self.epochs < 1:
            raise BadParameterError("a schedule needs at least one epoch of at least one step")
        if self.name == "step" and not self.milestones:
            self.milestones = default_milestones(self.epochs)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        """Learning rate for global step ``step`` (0-based)."""
        if self.name == "step":
            epoch = step // self.steps_per_epoch
            return self.lr * 0.1 ** sum(epoch >= m for m in self.milestones)
        if self.name == "cosine":
            warm = int(round(self.warmup_epochs * self.steps_per_epoch))
            if step < warm:
                return self.lr * (step + 1) / warm
            return _cos_anneal(self.lr, 0.0, (step - warm) / max(1, self.total_steps - warm))
        # onecycle, with OneCycleLR's phase boundaries
        initial = self.lr / self.div_factor
        final = initial / self.final_div_factor
        peak_step = float(self.pct_start * self.total_steps) - 1
        last_step = self.total_steps - 1
        if step <= peak_step:
            return _cos_anneal(initial, self.lr, step / max(peak_step, 1e-12))
        return _cos_anneal(self.lr, final, (step - peak_step) / max(last_step - peak_step, 1e-12))
