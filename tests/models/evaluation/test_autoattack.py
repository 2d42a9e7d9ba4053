"""AutoAttack robust accuracy (models/evaluation/autoattack.py) through the pyautoattack package,
on a tiny network: the budget per data set, what runs, and accuracies that respond to eps."""

import math

import pytest

from models.errors import BadParameterError
from models.evaluation.autoattack import autoattack_accuracy, l2_eps, parse_attacks
from tests.support.checkpoints import make_tiny_model


def test_the_budget_is_cifar10s_rms_on_every_input_size():
    assert l2_eps((3, 32, 32)) == pytest.approx(0.5)
    assert l2_eps((1, 28, 28)) == pytest.approx(0.5 * 28 / math.sqrt(3072))


def test_parse_attacks():
    assert parse_attacks("standard") == ("standard", None)
    assert parse_attacks("apgd-ce, apgd-t,apgd-ce") == ("custom", ["apgd-ce", "apgd-t"])
    with pytest.raises(BadParameterError):
        parse_attacks("pgd")


def test_robust_accuracy_responds_to_the_budget(tiny_model, images):
    labels = tiny_model(images).argmax(1)  # every image correct: clean accuracy 1
    tiny = autoattack_accuracy(tiny_model, images, labels, attacks="apgd-ce", rms=1e-7, seed=3)
    large = autoattack_accuracy(tiny_model, images, labels, attacks="apgd-ce", rms=0.2, seed=3)
    assert tiny.clean_accuracy == 1.0 and tiny.robust_accuracy == 1.0
    assert large.robust_accuracy < 0.5
    again = autoattack_accuracy(tiny_model, images, labels, attacks="apgd-ce", rms=0.2, seed=3)
    assert again.robust_accuracy == large.robust_accuracy  # seeded
    assert large.settings["eps"] == pytest.approx(0.2 * math.sqrt(3072))
    assert large.settings["attacks"] == ["apgd-ce"] and large.settings["version"] == "custom"
    assert large.settings["package"].startswith("pyautoattack ")
    record = large.metrics_record("test.tar", 1776)
    assert record["autoattack_n"] == 6 and record["autoattack_seed"] == 1776
    assert record["autoattack_settings"]["norm"] == "L2"


def test_dlr_attacks_are_refused_on_two_classes(images):
    model = make_tiny_model(num_classes=2)
    labels = model(images).argmax(1)
    with pytest.raises(BadParameterError, match="DLR"):
        autoattack_accuracy(model, images, labels, attacks="apgd-ce,apgd-t")
