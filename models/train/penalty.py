"""The Lipschitz-inspired training penalty ("robust additions") and the adaptive psi.

Per batch (Woods, Chen & Teuscher 2019; see docs ALGORITHMS.md):

1. ``logits = f(x)`` with ``x.requires_grad``; ``CE`` = mean cross-entropy.
2. Per sample a scalar s: with probability 1 - zeta a uniformly random logit; with
   probability zeta ("tandem") the margin ``logit_y - max_{j != y} logit_j``.
3. ``G = d(sum s)/dx`` with ``create_graph=True`` (double back-propagation).
4. ``penalty = psi * mean(|G|^z)`` over every element of the batch.

psi adapts: ``psi = psi0 * exp(k_psi * S)`` where, every batch and before the penalty,
``S <- max(0, S + clip(-ln(CE / L_target), -eps_worse, +eps_better))``. psi therefore climbs
fast while the classifier is better than ``L_target`` and eases slowly when it is worse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from models.defaults import EPS_BETTER, EPS_WORSE, K_PSI, L_TARGET, PSI0, ZETA, Z


@dataclass
class AdaptivePsi:
    """The adaptive penalty weight. ``S`` is the running sum the reference calls
    ``robust_integration``; it is all the state there is (saved in checkpoints)."""

    psi0: float = PSI0
    k_psi: float = K_PSI
    l_target: float = L_TARGET
    eps_better: float = EPS_BETTER
    eps_worse: float = EPS_WORSE
    S: float = 0.0

    @property
    def psi(self) -> float:
        return self.psi0 * math.exp(self.k_psi * self.S)

    def update(self, ce: float) -> float:
        """Fold in one batch's mean cross-entropy and return the new psi.

        A CE of zero (or below) means "infinitely better than the target" and takes the
        full ``eps_better`` step, as the clipped ``-ln`` would.
        """
        ce = float(ce)
        if not math.isfinite(ce):
            raise ValueError(f"cross-entropy is not finite ({ce}); training diverged")
        step = self.eps_better if ce <= 0.0 else -math.log(ce / self.l_target)
        step = min(self.eps_better, max(-self.eps_worse, step))
        self.S = max(0.0, self.S + step)
        return self.psi

    def state_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in asdict(self):
            if k in state:
                setattr(self, k, float(state[k]))


def penalty_scalars(
    logits: torch.Tensor, labels: torch.Tensor, zeta: float = ZETA, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The per-sample scalar whose input gradient is penalised.

    logits: N x C (attached to the graph); labels: int64 N. Returns N values: the margin
    ``logit_y - max_{j != y} logit_j`` where a Bernoulli(zeta) draw says so, else the logit
    of a uniformly random class. ``generator`` (CPU) makes the draws reproducible.
    """
    n, c = logits.shape
    random_class = torch.randint(0, c, (n,), generator=generator).to(logits.device)
    tandem = (torch.rand(n, generator=generator) < zeta).to(logits.device)
    fair = logits.gather(1, random_class.unsqueeze(1)).squeeze(1)
    if zeta <= 0:
        return fair
    true_logit = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    # Hide the true class so max() picks the best other one.
    is_true = torch.nn.functional.one_hot(labels, c).bool()
    others = logits.masked_fill(is_true, float("-inf"))
    margin = true_logit - others.max(1).values
    return torch.where(tandem, margin, fair)


def input_gradient_penalty(
    x: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    psi: float,
    zeta: float = ZETA,
    z: float = Z,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
) -> torch.Tensor:
    """``psi * mean(|d(sum s)/dx|^z)`` as a scalar tensor that back-propagates to the weights.

    x: N x C x H x W with ``requires_grad`` and ``logits = f(x)``. With ``create_graph`` the
    gradient G stays in the graph, so ``penalty.backward()`` differentiates through it
    (double back-propagation; HHReLU's smooth derivative makes that useful).
    """
    if not x.requires_grad:
        raise ValueError("x must require grad: call x.requires_grad_() before the forward pass")
    s = penalty_scalars(logits, labels, zeta, generator)
    (grad,) = torch.autograd.grad(s.sum(), x, create_graph=create_graph)
    return psi * grad.abs().pow(z).mean()
