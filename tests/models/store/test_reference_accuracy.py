"""The paper's four released networks, imported safely, score the reference figures on all
10,000 JPEG test images (ALGORITHMS.md: measured with the reference code)."""

import pytest

from models.data.datasets import load_dataset
from models.evaluation.accuracy import accuracy
from models.store.checkpoint import load_checkpoint
from models.store.reference import import_reference

REFERENCE_ACCURACY = {"standard": 0.8250, "adv-train": 0.8533, "all": 0.6681, "robust": 0.6664}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE_ACCURACY))
def test_full_test_set_accuracy_matches_reference(name, reference_checkpoints, cifar_test_tar, tmp_path):
    out = tmp_path / f"{name}.safetensors"
    import_reference(reference_checkpoints / f"resnet44-{name}.pt", out)
    model, meta = load_checkpoint(out)
    ds = load_dataset(cifar_test_tar, "test")
    assert len(ds) == 10_000
    acc = accuracy(model, ds.images, ds.labels, batch_size=500)
    assert abs(acc - REFERENCE_ACCURACY[name]) <= 0.0015, f"{name}: {acc:.4f} vs {REFERENCE_ACCURACY[name]}"
