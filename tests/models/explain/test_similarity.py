"""Spearman rank correlation and SSIM between maps (models/explain/similarity.py)."""

import numpy as np
import pytest
import scipy.stats as stats
import torch

from models.explain.similarity import average_ranks, normalise, spearman, ssim


def test_spearman_equals_scipys_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(12, 12)).astype(np.float32)  # many ties
    b = a + rng.normal(0, 2, size=a.shape).astype(np.float32)
    expected = stats.spearmanr(a.reshape(-1), b.reshape(-1)).statistic
    assert spearman(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, abs=1e-9)
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_spearman_extremes():
    a = torch.rand(8, 8, generator=torch.Generator().manual_seed(1))
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.zeros(8, 8)) == 0.0  # a constant map orders nothing


def test_ssim_is_one_for_equal_maps_and_low_for_unrelated_ones():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(32, 32, generator=g), torch.rand(32, 32, generator=g)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(ssim(b, a))
    assert abs(ssim(a, b)) < 0.2
    assert ssim(a, (a + 0.05 * b).clamp(0, 1)) > 0.9
    assert ssim(torch.rand(5, 7, generator=g), torch.rand(5, 7, generator=g)) < 1.0  # a window cut to the map
    with pytest.raises(ValueError):
        ssim(a, b[:16])


def test_normalise():
    m = normalise(torch.tensor([[2.0, 4.0], [3.0, 2.0]]))
    assert float(m.min()) == 0.0 and float(m.max()) == 1.0
    assert float(normalise(torch.ones(3, 3)).abs().sum()) == 0.0
