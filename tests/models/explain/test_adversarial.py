import json

import numpy as np
import pytest
import torch

from models.errors import BadParameterError, BoundNotReachedError
from models.explain.adversarial import Explainer, TargetExplanation, explain
from models.explain.gradcam import gradcam
from models.explain.targets import resolve_targets
from models.render.explanation import difference_uint8, explanation_uint8, write_explanation

CLASSES = [f"c{i}" for i in range(10)]


def test_default_targets_raise_each_target_probability(tiny_hh_model, images):
    x = images[0]
    res = explain(tiny_hh_model, x, classes=CLASSES)
    probs = tiny_hh_model(x[None]).softmax(1)[0].detach()
    order = probs.argsort(descending=True).tolist()
    assert res.predicted == order[0] and res.runner_up == order[1]
    roles = [t.role for t in res.targets]
    assert roles == ["predicted", "runner-up"] + ["class"] * 10
    assert [t.class_index for t in res.targets] == [order[0], order[1], *range(10)]
    for t in res.targets:
        assert t.class_name == CLASSES[t.class_index]
        assert t.prob_after > t.prob_before
        assert 0.08 < t.rms < 0.12  # the budget rho = 0.1 (k = 5 overshoots, then pulls back)
        torch.testing.assert_close(t.image, x + t.delta)
        torch.testing.assert_close(t.probs_before, probs)
        with torch.no_grad():
            torch.testing.assert_close(tiny_hh_model(t.image[None]).softmax(1)[0], t.probs_after, atol=1e-5, rtol=1e-4)
    # The same class asked twice is the same explanation.
    assert torch.equal(res.targets[0].delta, res.targets[2 + order[0]].delta)


def test_chunked_batches_agree_with_one_batch(tiny_model, images):
    one = Explainer(tiny_model, CLASSES).explain(images[1], ["all"])
    chunked = Explainer(tiny_model, CLASSES, batch_size=3).explain(images[1], ["all"])
    for a, b in zip(one.targets, chunked.targets):
        torch.testing.assert_close(a.delta, b.delta, atol=1e-5, rtol=1e-4)


def test_target_specs(tiny_model, images):
    probs = torch.tensor([0.1, 0.5, 0.2, 0.2] + [0.0] * 6)
    got = resolve_targets(["predicted", "second", "c7", 3, "4"], probs, CLASSES)
    assert got == [("predicted", 1), ("runner-up", 2), ("class", 7), ("class", 3), ("class", 4)]
    with pytest.raises(BadParameterError, match="unknown target"):
        resolve_targets(["zebra"], probs, CLASSES)
    with pytest.raises(BadParameterError, match="out of range"):
        resolve_targets([12], probs, CLASSES)
    with pytest.raises(BadParameterError):
        explain(tiny_model, images[:2], classes=CLASSES)  # a batch, not one image


def test_bound_check_is_optional(tiny_model, images):
    # Steps adding up to half of rho never reach it.
    with pytest.raises(BoundNotReachedError, match="increase rho"):
        explain(tiny_model, images[0], ["predicted"], steps=5, overshoot=0.5)
    res = explain(tiny_model, images[0], ["predicted"], steps=5, overshoot=0.5, bound_check=False)
    assert res.targets[0].rms <= 0.05 + 1e-6


def test_display_arrays():
    delta = torch.zeros(3, 4, 4)
    delta[0, 0, 0] = 0.2
    delta[1, 1, 1] = -0.1
    x = torch.full((3, 4, 4), 0.9)
    t = TargetExplanation(
        "class", 0, "a", x + delta, delta, float(delta.pow(2).mean().sqrt()), torch.ones(2) / 2, torch.ones(2) / 2
    )
    img = explanation_uint8(t)
    assert img.shape == (4, 4, 3) and img.dtype == np.uint8
    assert img[0, 0, 0] == 255  # 1.1 clamped for display
    diff = difference_uint8(t)
    assert diff[0, 0, 0] == 255 and diff[1, 1, 1] == 64 and diff[2, 2, 2] == 128
    grey = TargetExplanation(
        "class", 0, "a", torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), 0.0, torch.ones(2) / 2, torch.ones(2) / 2
    )
    assert difference_uint8(grey).shape == (4, 4) and np.all(difference_uint8(grey) == 128)


def test_write_explanation_folder(tiny_model, images, tmp_path):
    res = explain(tiny_model, images[2], ["predicted", "c3"], classes=CLASSES)
    cam = gradcam(tiny_model, images[2:3], [res.predicted])[0]
    summary = write_explanation(tmp_path / "out", res, cam, extra_summary={"checkpoint": "x"})
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"input.png", "gradcam.png", "gradcam_overlay.png", "summary.json"} <= names
    for t in summary["targets"]:
        assert t["image"] in names and t["difference"] in names
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["targets"][1]["class_name"] == "c3" and on_disk["checkpoint"] == "x"
    assert on_disk["predicted"]["class_index"] == res.predicted


def test_the_pngs_encode_the_picture_arrays_exactly(tiny_model, images):
    """One set of uint8 arrays (``pictures``) is what the PNGs encode (and what the DICOM
    Secondary Captures are made from): each PNG decodes to its array, bit for bit."""
    import io

    from PIL import Image

    from models.render.explanation import name_pictures, pictures, png_files

    res = explain(tiny_model, images[1], ["predicted", "runner-up"], classes=CLASSES)
    cam = gradcam(tiny_model, images[1:2], [res.predicted])[0]
    arrays = pictures(res, cam)
    summary = name_pictures(res.summary(), res, with_map=True)
    named = {*summary["files"].values(), *(t[k] for t in summary["targets"] for k in ("image", "difference"))}
    assert set(arrays) == named
    for name, data in png_files(arrays).items():
        assert arrays[name].dtype == np.uint8 and arrays[name].flags.c_contiguous
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), arrays[name], err_msg=name)
