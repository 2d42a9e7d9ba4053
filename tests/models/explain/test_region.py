"""The most salient area of a map: the box around the connected region at half its peak or more that holds the peak."""

import numpy as np
import pytest

from models.explain.region import salient_box


def test_the_box_holds_the_peaks_region_only():
    saliency = np.zeros((6, 8))
    saliency[1:3, 2:5] = 1.0  # the peak's region
    saliency[3, 4] = 0.6  # touches it (4-connected): inside
    saliency[5, 7] = 0.9  # salient but apart: outside
    saliency[4, 0] = 0.4  # under half the peak
    assert salient_box(saliency) == (2, 1, 5, 4)


def test_a_region_that_winds_back_is_followed():
    saliency = np.zeros((5, 7))
    saliency[0, 0:7] = 1.0  # a U: the peak at (0, 0), its right arm reached through the top row
    saliency[1:5, 0] = 0.8
    saliency[1:5, 6] = 0.8
    saliency[4, 6] = 0.8
    saliency[2, 3] = 0.9  # inside the U but not connected
    assert salient_box(saliency) == (0, 0, 7, 5)
    assert salient_box(saliency, fraction=0.85) == (0, 0, 7, 1)


def test_a_flat_map_gives_the_whole_grid_and_a_gaussian_its_core():
    assert salient_box(np.zeros((3, 4))) == (0, 0, 4, 3)
    yy, xx = np.mgrid[0:200, 0:300]
    blob = np.exp(-((xx - 210) ** 2 + (yy - 60) ** 2) / (2 * 20.0**2))
    left, top, right, bottom = salient_box(blob)
    # Half the peak lies at 1.18 sigma from the centre: 23.5 px on each side.
    assert (left, top, right, bottom) == (187, 37, 234, 84)


def test_not_a_map():
    with pytest.raises(ValueError, match="2-D"):
        salient_box(np.zeros((2, 2, 3)))
