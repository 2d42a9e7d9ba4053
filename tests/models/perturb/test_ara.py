import numpy as np
import pytest
import torch

from models.errors import BadParameterError
from models.perturb.ara import accuracy_curve, ara_from_radii, compute_ara
from models.render.plots import plot_ara


def test_ara_histogram_formula_by_hand():
    # max r = 1 -> 1000 bins of width 0.001; the radii sit inside bins 0, 250, 500 and 999.
    r = [0.0, 0.2505, 0.5005, 1.0]
    # cumsum/N is 1/4 for bins 0..249, 2/4 for 250..499, 3/4 for 500..998 and 1 for bin 999,
    # so with C = 10 the bins contribute 0.65, 0.40, 0.15 and max(0, -0.1) = 0.
    hand = 0.001 * (250 * 0.65 + 250 * 0.40 + 499 * 0.15)
    assert ara_from_radii(r, num_classes=10) == pytest.approx(hand, abs=1e-9)
    # The exact integral of max(0, A(rho) - 1/C) differs by less than about a bin width.
    exact = 0.2505 * 0.65 + 0.25 * 0.40 + 0.4995 * 0.15
    assert abs(ara_from_radii(r, 10) - exact) < 2e-3


def test_ara_edge_cases():
    assert ara_from_radii([0.0, 0.0], 10) == 0.0  # everything wrong: no area
    # All radii equal: the last bin holds all of them; area = (bins - 1) * w * (1 - 1/C).
    assert ara_from_radii([0.5, 0.5], 2) == pytest.approx(999 * 0.0005 * 0.5)
    with pytest.raises(BadParameterError):
        ara_from_radii([], 10)
    with pytest.raises(BadParameterError):
        ara_from_radii([0.1, -1.0], 10)


def test_accuracy_curve_is_exact_fraction_above():
    c = accuracy_curve([0.0, 0.15, 0.3, 0.3], points=4)
    np.testing.assert_allclose(c.rho, [0.0, 0.1, 0.2, 0.3])
    np.testing.assert_allclose(c.accuracy, [0.75, 0.75, 0.5, 0.0])


def test_compute_ara_on_a_tiny_network(tiny_hh_model, images, tmp_path):
    with torch.no_grad():
        pred = tiny_hh_model(images).argmax(1)
    labels = pred.clone()
    labels[:2] = (pred[:2] + 1) % 10  # two images wrong from the start
    u8 = (images * 255).round().to(torch.uint8)
    seen = []
    res = compute_ara(
        tiny_hh_model, u8, labels, batch_size=4, steps=40, eps=2.0, on_batch=lambda d, t: seen.append((d, t))
    )
    assert seen == [(1, 2), (2, 2)]
    assert res.n == 6 and res.num_classes == 10
    x = u8.float() / 255
    with torch.no_grad():
        correct = (tiny_hh_model(x).argmax(1) == labels).float().mean().item()
    assert res.accuracy == pytest.approx(correct)
    assert res.attack_r.shape == (6,) and res.btr_r.shape == (6,)
    wrong = (tiny_hh_model(x).argmax(1) != labels).numpy()
    assert np.all(res.attack_r[wrong] == 0) and np.all(res.attack_r[~wrong] > 0)
    assert res.attack_ara == pytest.approx(ara_from_radii(res.attack_r, 10))
    assert res.btr_ara == pytest.approx(ara_from_radii(res.btr_r, 10))
    assert res.attack_ara > 0 and res.btr_ara > 0
    assert res.attack_curve.accuracy[0] == pytest.approx(res.accuracy)
    out = plot_ara(res, tmp_path / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
