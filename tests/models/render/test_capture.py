"""The Secondary Captures' pictures: enlarged by whole-pixel blocks to a readable size, captioned below, the same pixels every time."""

from __future__ import annotations

import numpy as np
import pytest

from models.render.capture import MIN_LONG_SIDE, capture_pictures, readable, scale_factor


@pytest.mark.parametrize("shape, k", [((28, 28), 19), ((32, 24), 16), ((512, 300), 1), ((600, 700), 1), ((1, 1), 512)])
def test_the_smallest_whole_factor_reaching_the_long_side(shape, k):
    assert scale_factor(*shape) == k
    assert max(shape) * k >= MIN_LONG_SIDE and (k == 1 or max(shape) * (k - 1) < MIN_LONG_SIDE)


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_each_model_pixel_is_one_sharp_block_above_a_caption(channels):
    rng = np.random.default_rng(4)
    shape = (28, 20) if channels is None else (28, 20, channels)
    image = (rng.random(shape) * 255).astype(np.uint8)
    out = readable(image, "Grad-CAM of pneumonia", 28)
    k = scale_factor(28, 20)
    assert out.dtype == np.uint8 and out.shape[1] == 20 * k and out.shape[2] == 3
    assert out.shape[0] > 28 * k and max(28 * k, 20 * k) >= MIN_LONG_SIDE
    rgb = image if channels == 3 else np.repeat(image.reshape(28, 20, 1), 3, axis=-1)
    picture = out[: 28 * k]
    # Nearest neighbour: every pixel of block (i, j) is the model's pixel (i, j), nothing blended.
    np.testing.assert_array_equal(picture, np.repeat(np.repeat(rgb, k, axis=0), k, axis=1))
    band = out[28 * k :]
    assert (band == 255).all(axis=-1).any()  # white text on it
    assert ((band == 0).all(axis=-1).mean()) > 0.5  # on black
    np.testing.assert_array_equal(readable(image, "Grad-CAM of pneumonia", 28), out)  # the same every time


def test_a_float_picture_and_a_longer_title_wrap():
    image = np.linspace(0, 1, 28 * 28).reshape(28, 28)
    short = readable(image, "x", 28)
    long = readable(image, "adversarial explanation toward runner-up normal: delta, amplified " * 3, 28)
    assert long.shape[0] > short.shape[0] and long.shape[1] == short.shape[1]
    assert short[0, 0].tolist() == [0, 0, 0] and short[28 * 19 - 1, 28 * 19 - 1].tolist() == [255, 255, 255]


def test_capture_pictures_names_roles_and_sizes():
    pictures = {
        "gradcam_overlay.png": np.zeros((28, 28, 3), np.uint8),
        "00_predicted_pneumonia.png": np.zeros((28, 28), np.uint8),
        "00_predicted_pneumonia_diff.png": np.zeros((28, 28), np.uint8),
        "input.png": np.zeros((28, 28), np.uint8),
    }
    summary = {
        "predicted": {"class_name": "pneumonia"},
        "probs": {"normal": 0.2, "pneumonia": 0.8},
        "gradcam": {"class_index": 1},
        "targets": [
            {
                "role": "predicted",
                "class_name": "pneumonia",
                "image": "00_predicted_pneumonia.png",
                "difference": "00_predicted_pneumonia_diff.png",
            }
        ],
    }
    got = capture_pictures(pictures, summary, 28)
    assert [(name, role) for name, role, _ in got] == [
        ("gradcam_overlay", "gradcam_overlay"),
        ("00_predicted_pneumonia", "explanation"),
        ("00_predicted_pneumonia_diff", "explanation_difference"),
    ]
    assert all(max(img.shape[:2]) >= MIN_LONG_SIDE and img.shape[2] == 3 for _, _, img in got)
