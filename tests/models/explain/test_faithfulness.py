"""Deletion and insertion AUCs of a map (models/explain/faithfulness.py): a map that really
drives the model beats the random order, the batched curves equal step-by-step forwards, the
figures are deterministic and in [0, 1]."""

import pytest
import torch
from torch import nn

from models.errors import BadParameterError
from models.explain.faithfulness import (
    auc,
    blurred,
    delta_map,
    faithfulness,
    faithfulness_method,
    pixel_order,
    random_order,
    step_counts,
)
from models.explain.gradcam import gradcam

KEYS = ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc")


class RegionModel(nn.Module):
    """Two classes; the logit of class 0 is 30 x (mean of the central 8 x 8 block of channel 0
    - 0.6), class 1's is 0: only that block decides."""

    def forward(self, x):
        score = 30.0 * (x[:, 0, 12:20, 12:20].mean((1, 2)) - 0.6)
        return torch.stack([score, torch.zeros_like(score)], 1)


def region_image() -> torch.Tensor:
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5)) * 0.2
    x[:, 12:20, 12:20] = 1.0
    return x


def region_map() -> torch.Tensor:
    m = torch.zeros(32, 32)
    m[12:20, 12:20] = 1.0
    return m


def test_a_map_that_drives_the_model_beats_the_random_order():
    model, x = RegionModel(), region_image()
    right, wrong = region_map(), 1.0 - region_map()
    good, bad = faithfulness(model, x, [right, wrong], [0, 0])
    assert good["deletion_auc"] < 0.5 * good["random_deletion_auc"]
    assert good["insertion_auc"] > good["random_insertion_auc"] + 0.1
    assert bad["deletion_auc"] > bad["random_deletion_auc"]  # the wrong map removes the block last
    assert bad["insertion_auc"] < bad["random_insertion_auc"]
    # The random order is the same for both maps of one class.
    assert good["random_deletion_auc"] == bad["random_deletion_auc"]


def test_curves_end_at_the_input_and_the_baseline():
    model, x = RegionModel(), region_image()
    (f,) = faithfulness(model, x, [region_map()], [0], steps=8)
    p_x = float(model(x[None]).softmax(1)[0, 0])
    p_b = float(model(blurred(x)[None]).softmax(1)[0, 0])
    for key in ("deletion_curve", "random_deletion_curve"):
        assert len(f[key]) == 9 and f[key][0] == pytest.approx(p_x, abs=1e-6) and f[key][-1] == pytest.approx(p_b)
    for key in ("insertion_curve", "random_insertion_curve"):
        assert f[key][0] == pytest.approx(p_b, abs=1e-6) and f[key][-1] == pytest.approx(p_x, abs=1e-6)
    assert f["deletion_auc"] == pytest.approx(auc(f["deletion_curve"]))


def step_by_step(model, x, order, steps, c):
    """The curves computed the plain way: one image, one forward per step."""
    b = blurred(x)
    h, w = x.shape[1:]
    deletion, insertion = [], []
    for count in step_counts(h * w, steps):
        mask = torch.zeros(h * w, dtype=torch.bool)
        mask[order[:count]] = True
        mask = mask.view(1, h, w)
        with torch.no_grad():
            deletion.append(float(model(torch.where(mask, b, x)[None]).softmax(1)[0, c]))
            insertion.append(float(model(torch.where(mask, x, b)[None]).softmax(1)[0, c]))
    return deletion, insertion


def test_the_batched_forward_equals_one_forward_per_step(tiny_model, images):
    x = images[0]
    cam = gradcam(tiny_model, x[None])[0]
    c = int(tiny_model(x[None]).argmax())
    (f,) = faithfulness(tiny_model, x, [cam], [c], steps=5, batch=7)
    deletion, insertion = step_by_step(tiny_model, x, pixel_order(cam), 5, c)
    assert f["deletion_curve"] == pytest.approx(deletion, abs=1e-5)
    assert f["insertion_curve"] == pytest.approx(insertion, abs=1e-5)
    r_del, r_ins = step_by_step(tiny_model, x, random_order(32 * 32), 5, c)
    assert f["random_deletion_curve"] == pytest.approx(r_del, abs=1e-5)
    assert f["random_insertion_curve"] == pytest.approx(r_ins, abs=1e-5)


def test_figures_are_in_range_and_deterministic(tiny_hh_model, images):
    x = images[1]
    maps = [torch.rand(32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    first = faithfulness(tiny_hh_model, x, maps, [0, 3, 7])
    again = faithfulness(tiny_hh_model, x, maps, [0, 3, 7])
    assert first == again
    for f in first:
        assert all(0.0 <= f[k] <= 1.0 for k in KEYS)
        assert len(f["deletion_curve"]) == 17  # K = 16 by default
    other_seed = faithfulness(tiny_hh_model, x, maps[:1], [0], seed=7)[0]
    assert other_seed["random_deletion_curve"] != first[0]["random_deletion_curve"]


def test_pixel_order_is_most_important_first_with_stable_ties():
    m = torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    assert pixel_order(m).tolist() == [1, 2, 3, 0]
    assert step_counts(10, 4) == [0, 2, 5, 7, 10]
    assert sorted(random_order(50).tolist()) == list(range(50))
    assert torch.equal(random_order(50, 3), random_order(50, 3))


def test_baseline_blur_and_delta_map():
    flat = torch.full((3, 28, 28), 0.25)
    assert torch.allclose(blurred(flat), flat)
    x = region_image()
    b = blurred(x)
    assert b.shape == x.shape and float(b.min()) >= 0 and float(b.max()) <= 1
    assert float(b[:, 12:20, 12:20].mean()) < 0.6 * float(x[:, 12:20, 12:20].mean())  # the block is smeared out
    delta = torch.zeros(3, 4, 4)
    delta[0, 1, 2], delta[2, 1, 2] = -0.5, 0.25
    m = delta_map(delta)
    assert m.shape == (4, 4) and float(m[1, 2]) == pytest.approx(0.75) and float(m.sum()) == pytest.approx(0.75)


def test_bad_inputs_are_refused():
    model, x = RegionModel(), region_image()
    with pytest.raises(BadParameterError):
        faithfulness(model, x, [torch.zeros(16, 16)], [0])
    with pytest.raises(BadParameterError):
        faithfulness(model, x, [region_map()], [0, 1])
    with pytest.raises(BadParameterError):
        faithfulness(model, x, [region_map()], [0], steps=0)


def test_the_method_states_the_definition():
    method = faithfulness_method(16, 1776, 0.125)
    assert method["steps"] == 16 and "1776" in method["random_order"] and "0.125" in method["baseline"]
