import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.datasets import load_dataset
from models.data.splits import seeded_subset
from models.errors import DataError


def _make_folder(root, classes=("cat", "dog"), per_class=3, size=16):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i:04d}.png")


def test_imagefolder_dir_and_tar_agree(tmp_path):
    _make_folder(tmp_path / "imgs" / "test")
    d = load_dataset(tmp_path / "imgs", "test")
    assert d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.images.shape == (6, 3, 16, 16) and d.images.dtype == torch.uint8
    with tarfile.open(tmp_path / "set.tar", "w") as tf:
        tf.add(tmp_path / "imgs" / "test", arcname="test")
    t = load_dataset(tmp_path / "set.tar", "test")
    assert torch.equal(t.images, d.images) and torch.equal(t.labels, d.labels)
    again = load_dataset(tmp_path / "set.tar", "test")  # from the decode cache
    assert torch.equal(again.images, d.images)


def test_resize_to_model_size_and_grey(tmp_path):
    _make_folder(tmp_path / "imgs", size=40)
    d = load_dataset(tmp_path / "imgs", "test", input_size=28, in_channels=1)
    assert d.images.shape == (6, 1, 28, 28)


def test_npz_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "toy.npz",
        val_images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
        val_labels=np.array([[0], [1], [1], [0], [1]]),
    )
    d = load_dataset(tmp_path / "toy.npz", "val")
    assert d.images.shape == (5, 1, 28, 28) and d.labels.tolist() == [0, 1, 1, 0, 1]
    with pytest.raises(DataError, match="train_images"):
        load_dataset(tmp_path / "toy.npz", "train")


def test_missing_and_bad_data(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope", "test")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError):
        load_dataset(tmp_path / "x.txt", "test")


def test_seeded_subset_rule():
    expected = torch.randperm(10000, generator=torch.Generator().manual_seed(1776))[:100]
    assert torch.equal(seeded_subset(10000, 100, 1776), expected)


def test_cifar_test_tar_order(cifar_test_tar):
    d = load_dataset(cifar_test_tar, "test")
    assert len(d) == 10000 and d.classes[0] == "airplane" and d.classes[-1] == "truck"
    assert d.labels[:1000].eq(0).all() and d.labels[-1000:].eq(9).all()
