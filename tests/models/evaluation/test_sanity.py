"""The cascading randomisation check (models/evaluation/sanity.py): randomising the weights
drops the rank correlation of the maps; the model itself is untouched; a run repeats."""

import pytest
import torch

from models.evaluation.sanity import compare, parametrised_layers, randomise, sanity_check


def test_randomising_the_weights_drops_the_correlation(tiny_hh_model, images):
    before = {k: v.clone() for k, v in tiny_hh_model.state_dict().items()}
    res = sanity_check(tiny_hh_model, images[:3], stages=(0.0, 1.0), steps=6)
    assert all(torch.equal(before[k], v) for k, v in tiny_hh_model.state_dict().items())  # copies only
    first, last = res["stages"]
    layers = parametrised_layers(tiny_hh_model)
    assert (first["randomised"], last["randomised"], last["of"]) == (1, len(layers), len(layers))
    assert first["down_to"] == layers[-1][0] and last["down_to"] == layers[0][0]
    for method in ("gradcam", "adversarial"):
        assert last[method]["spearman"]["mean"] < 0.6
        assert -1.0 <= last[method]["spearman"]["mean"] <= 1.0 and last[method]["ssim"]["mean"] <= 1.0
    assert res["follows_weights"]["adversarial"] is (last["adversarial"]["spearman"]["mean"] < 0.5)
    assert "Spearman" in res["verdict"]["adversarial"] and res["n"] == 3
    again = sanity_check(tiny_hh_model, images[:3], stages=(0.0, 1.0), steps=6)
    assert again["stages"] == res["stages"]


def test_an_unchanged_network_gives_perfect_agreement(tiny_model, images):
    maps = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0))
    same = compare(maps, maps.clone())
    assert same["spearman"]["mean"] == pytest.approx(1.0) and same["ssim"]["mean"] == pytest.approx(1.0)


def test_randomise_is_seeded_and_leaves_the_global_rng_alone(tiny_model):
    name, layer = parametrised_layers(tiny_model)[-1]
    state = torch.random.get_rng_state()
    randomise(layer, 5)
    first = [p.clone() for p in layer.parameters()]
    randomise(layer, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, layer.parameters()))
    assert torch.equal(state, torch.random.get_rng_state())
