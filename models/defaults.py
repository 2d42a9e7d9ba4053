"""Every default of the science core, in one place: explanation (rho, steps, overshoot,
momentum, targets), the ARA and stability searches (steps, eps, overshoot, momentum, bins)
and the robust training penalty (adaptive psi, zeta, z, HHReLU delta).

The CLI, the request schemas of the API, the workers and the algorithms read these names;
none of them writes its own copy of a number. The values are the reference code's
(wwoods/adversarial-explanations-cifar; ALGORITHMS.md). Torch-free.
"""

from __future__ import annotations

from enum import StrEnum

# Adversarial explanations: the explain-mode search (ALGORITHMS.md "Adversarial explanations").
EXPLAIN_RHO = 0.1  # budget: rms(delta), pixels in [0, 1]
EXPLAIN_STEPS = 35  # S
EXPLAIN_OVERSHOOT = 5.0  # k: the steps sum to rho * k
EXPLAIN_MOMENTUM = 0.0  # mu
# What is explained when nothing is named (the targets grammar: models.explain.targets): the
# paper's figure (the decision, its runner-up and every class) for the library and the offline
# command; the decision and its runner-up for a request to the service (each class costs a row).
DEFAULT_TARGETS = ("predicted", "runner-up", "all")
REQUEST_TARGETS = ("predicted", "runner-up")

# Accuracy-Robustness Area and the stability score: the l2min and btr searches.
ARA_STEPS = 450
ARA_EPS = 20.0  # the step scale of l2min/btr (no budget: the search stops at the flip)
ARA_OVERSHOOT = 1.0
ARA_MOMENTUM = 0.9
ARA_BINS = 1000  # histogram bins of the area integral
ARA_SEED = 1776  # the seed of the evaluation subset (randperm rule of the data README)


class StabilityMode(StrEnum):
    """How the stability score's radii are found (models/perturb/minimal.py): ``fast``
    estimates the two ARA radii of one image in a fraction of the exact searches'
    evaluations; ``exact`` runs them. The one spelling of the mode, from the request to the
    search."""

    FAST = "fast"
    EXACT = "exact"


STABILITY_MODE = StabilityMode.FAST
STABILITY_FAST_OPENING = 40  # steps of the exact search's own schedule first
STABILITY_FAST_SETTLE = 60  # then this many settling steps, scaled to each row's radius
STABILITY_FAST_SCALE = 0.5  # settling steps sum to this x settle x the row's best radius
STABILITY_FAST_REFINE = 8  # then halvings of the best delta's scale while it stays past the bound

# The robust training penalty and its adaptive weight psi = psi0 * exp(k_psi * S).
PSI0 = 220.0
K_PSI = 0.02
L_TARGET = 1.5  # the cross-entropy psi steers toward (CIFAR-10; scaled by ln C elsewhere)
EPS_BETTER = 1.0  # largest step of S up per batch
EPS_WORSE = 0.01  # largest step of S down per batch
ZETA = 0.2  # probability of the margin (tandem) scalar
Z = 2.0  # exponent of |gradient| in the penalty
HHRELU_DELTA = 0.5

# Faithfulness of a map (models/explain/faithfulness.py): RISE deletion and insertion curves
# of the explained class's probability, in K equal steps, against a blurred copy of the input,
# beside the same curves in a seeded random pixel order.
FAITHFULNESS_STEPS = 16  # K
FAITHFULNESS_BLUR_SIGMA = 0.125  # Gaussian blur of the baseline: sigma = this x the image's longer side
FAITHFULNESS_SEED = 1776  # seed of the random pixel order
FAITHFULNESS_BATCH = 32  # rows per forward pass of the curves (channels-last on the CPU: 32 ran 28% faster than 122)

# AutoAttack robust accuracy (models/evaluation/autoattack.py): L2 at eps 0.5 on CIFAR-10
# (3 x 32 x 32), i.e. an RMS of 0.5 / sqrt(3072) ~ 0.009; other input sizes keep that RMS.
AUTOATTACK_RMS = 0.5 / 3072**0.5
AUTOATTACK_ATTACKS = "standard"  # AutoAttack's standard version, or attacks joined by commas
AUTOATTACK_N = 100

# The sanity check of the maps (models/evaluation/sanity.py): cascading randomisation of the
# weights from the logits down (Adebayo et al. 2018), on the first images of the seeded subset.
SANITY_N = 32
SANITY_SEED = 0  # seed of the random weights
SANITY_STAGES = (0.0, 0.25, 0.5, 1.0)  # fraction of the layers randomised (0: the output layer alone)
SANITY_FOLLOWS_BELOW = 0.5  # a map "follows the weights" when full randomisation leaves a mean Spearman below this
