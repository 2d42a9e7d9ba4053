"""Scaling into [0, 1] (``models.scaling``): float64 throughout, so finite values never become
infinite or NaN, whatever their magnitude; an image whose values are all equal is 0."""

from __future__ import annotations

import numpy as np
import pytest

from models.scaling import non_finite_counts, unit_range

F64_MAX = float(np.finfo(np.float64).max)
F64_TINY = float(np.finfo(np.float64).smallest_subnormal)  # 5e-324


@pytest.mark.parametrize(
    "values, expected",
    [
        ([-F64_MAX, 0.0, F64_MAX], [0.0, 0.5, 1.0]),  # the span overflows float64: halved
        ([-1e308, 1e308, 0.0], [0.0, 1.0, 0.5]),
        ([0.0, F64_TINY, 2 * F64_TINY], [0.0, 0.5, 1.0]),  # a subnormal span, divided as it is
        ([-3.4028235e38, 3.4028235e38, 0.0], [0.0, 1.0, 0.5]),  # float32's whole range
        ([-(2.0**31), 2.0**31 - 1], [0.0, 1.0]),
    ],
)
def test_extreme_finite_ranges_scale_exactly_into_0_1(values, expected):
    values = np.asarray(values)
    with np.errstate(all="raise"):  # not even an intermediate overflow
        out = unit_range(values, float(values.min()), float(values.max()))
    assert out.dtype == np.float64 and np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)


def test_float32_values_overflowed_before_and_do_not_now():
    values = np.array([3.4e38, -3.4e38, 0.0], dtype=np.float32)
    lo, hi = float(values.min()), float(values.max())
    with np.errstate(all="ignore"):
        old = (values - lo) / (hi - lo)  # the float32 scaling this replaces
    assert np.isnan(old).any()
    np.testing.assert_allclose(unit_range(values, lo, hi), [1.0, 0.0, 0.5], atol=1e-7)


@pytest.mark.parametrize("value", [0.0, 3.0e38, -F64_MAX, F64_TINY])
def test_all_equal_values_are_0_never_0_over_0(value):
    values = np.full((4, 5), value)
    out = unit_range(values, value, value)
    assert out.shape == (4, 5) and (out == 0.0).all()


def test_values_outside_the_range_are_clipped():
    np.testing.assert_array_equal(unit_range(np.array([-5.0, 5.0, 15.0]), 0.0, 10.0), [0.0, 0.5, 1.0])


@pytest.mark.parametrize("lo, hi", [(np.nan, 1.0), (0.0, np.inf), (-np.inf, 0.0), (2.0, 1.0)])
def test_a_range_that_is_not_finite_or_reversed_is_refused(lo, hi):
    with pytest.raises(ValueError):
        unit_range(np.zeros(3), lo, hi)


def test_non_finite_counts():
    assert non_finite_counts(np.array([np.nan, np.inf, -np.inf, -np.inf, 1.0])) == (1, 1, 2)
    assert non_finite_counts(np.array([1, 2], dtype=np.int64)) == (0, 0, 0)
    assert non_finite_counts(np.array([F64_TINY, -F64_MAX], dtype=np.float64)) == (0, 0, 0)
