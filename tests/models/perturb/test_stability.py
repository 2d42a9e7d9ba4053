import pytest
import torch

from models.perturb.ara import compute_ara
from models.perturb.stability import percentile_of, stability_score
from models.store.checkpoint import CheckpointMeta, load_checkpoint, read_metadata, save_checkpoint, update_metadata


def test_percentile_counts_strictly_smaller():
    assert percentile_of(0.5, [0.1, 0.2, 0.5, 0.9]) == 50.0
    assert percentile_of(1.0, [0.1, 0.2]) == 100.0
    assert percentile_of(0.0, [0.0, 0.1]) == 0.0
    assert percentile_of(0.3, []) is None


def test_stability_equals_the_ara_radius_of_a_correct_image(tiny_hh_model, images):
    with torch.no_grad():
        labels = tiny_hh_model(images).argmax(1)  # every image correctly classified
    steps = 60
    res = compute_ara(tiny_hh_model, images, labels, steps=steps, eps=5.0, bound_check=False)
    calls = []
    score = stability_score(
        tiny_hh_model,
        images[2],
        {"attack": res.attack_r.tolist(), "btr": res.btr_r.tolist()},
        steps=steps,
        eps=5.0,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert score["predicted"] == int(labels[2])
    assert score["attack_rms"] == pytest.approx(float(res.attack_r[2]), rel=1e-4, abs=1e-6)
    assert score["btr_rms"] == pytest.approx(float(res.btr_r[2]), rel=1e-4, abs=1e-6)
    assert score["attack_percentile"] == percentile_of(score["attack_rms"], res.attack_r.tolist())
    assert score["reference_n"] == 6
    assert calls[-1] == (2 * (steps + 1), 2 * (steps + 1))


def test_update_metadata_keeps_weights(tmp_path, tiny_model):
    meta = CheckpointMeta(
        arch="preact_resnet",
        arch_args=dict(depth=8, width=4, num_classes=10, input_size=32, zero_init_residual=False),
        classes=[str(i) for i in range(10)],
        input_size=32,
        in_channels=3,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        metrics={"test_accuracy": 0.5},
    )
    path = tmp_path / "m.safetensors"
    saved = save_checkpoint(path, tiny_model, meta)
    update_metadata(path, metrics={"ara_radii": {"attack": [0.1], "btr": [0.2]}})
    back = read_metadata(path)
    assert back.metrics["test_accuracy"] == 0.5 and back.metrics["ara_radii"]["attack"] == [0.1]
    assert back.weights_sha256 == saved.weights_sha256
    load_checkpoint(path)  # still loads, sha verified
    with pytest.raises(ValueError):
        update_metadata(path, weights_sha256="0" * 64)
