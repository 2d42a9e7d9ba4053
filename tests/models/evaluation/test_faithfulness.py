"""Faithfulness of a checkpoint's maps over a data set (models/evaluation/faithfulness.py): only
correctly classified images count, and the fractions agree with the per-image figures."""

import pytest
import torch

from models.evaluation.faithfulness import dataset_faithfulness
from models.explain.faithfulness import faithfulness
from models.explain.gradcam import gradcam


def test_only_correct_images_count_and_fractions_match_the_per_image_figures(tiny_hh_model, images):
    with torch.no_grad():
        predicted = tiny_hh_model(images).argmax(1)
    labels = predicted.clone()
    labels[:2] = (predicted[:2] + 1) % 10  # two wrong
    res = dataset_faithfulness(tiny_hh_model, images, labels, explain_steps=4)
    assert (res["n"], res["correct"]) == (6, 4)
    assert res["gradcam"]["n"] == res["adversarial"]["n"] == 4
    below = []
    for i in range(2, 6):
        cam = gradcam(tiny_hh_model, images[i : i + 1], [int(predicted[i])])[0]
        (f,) = faithfulness(tiny_hh_model, images[i], [cam], [int(predicted[i])])
        below.append(f["deletion_auc"] < f["random_deletion_auc"])
    assert res["gradcam"]["deletion_below_random"] == pytest.approx(sum(below) / 4)
    for m in ("gradcam", "adversarial"):
        assert 0.0 <= res[m]["mean_deletion_auc"] <= 1.0 and 0.0 <= res[m]["insertion_above_random"] <= 1.0
    assert res["settings"]["steps"] == 16 and res["settings"]["explain_steps"] == 4
