import os
import pickle
import subprocess

import pytest
import torch

from models.data.datasets import CIFAR10_CLASSES
from models.errors import CheckpointError, UnsafeCheckpointError
from models.nn.registry import create_model
from models.store.checkpoint import load_checkpoint, read_metadata
from models.store.reference import import_reference, load_reference, load_reference_file

NAMES = ["standard", "adv-train", "all", "robust"]


@pytest.mark.parametrize("name", NAMES)
def test_import_matches_the_state_dict_loaded_directly(reference_checkpoints, name, tmp_path):
    src = reference_checkpoints / f"resnet44-{name}.pt"
    meta = import_reference(src, tmp_path / "net.safetensors")
    model, meta2 = load_checkpoint(tmp_path / "net.safetensors")
    raw = load_reference_file(src)
    robust = bool(raw["training_options"]["robust_additions"])
    direct = create_model("resnet44_cifar", activation="hhrelu" if robust else "relu")
    direct.load_state_dict(raw["model_params"], strict=True)
    direct.eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), direct(x), atol=0, rtol=0)
    assert meta2.classes == CIFAR10_CLASSES and meta2.input_size == 32 and meta2.in_channels == 3
    assert meta2.arch_args["activation"] == ("hhrelu" if robust else "relu")
    assert meta2.mean == pytest.approx([0.4914, 0.4822, 0.4465]) and meta2.std == pytest.approx([0.247, 0.243, 0.261])
    assert meta2.extra["source_file"] == src.name and len(meta2.extra["source_sha256"]) == 64
    assert meta2.recipe["robust_additions"] == robust
    assert meta2.recipe["arch"]["preprocess"] == "__main__.cifar10_preprocess"
    if robust:
        # ALGORITHMS.md: the released networks ended with psi ~ 33,778 (robust), ~ 14,240 (all).
        assert meta2.psi_state["psi"] == pytest.approx({"robust": 33778, "all": 14240}[name], rel=1e-3)
    else:
        assert meta2.psi_state is None
    assert meta.weights_sha256 == read_metadata(tmp_path / "net.safetensors").weights_sha256


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Subprocess:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


def test_plain_pickle_with_os_system_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(pickle.dumps({"model_params": _System(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_reference(bad)
    assert not marker.exists()


def test_legacy_torch_file_with_a_hidden_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad_legacy.pt"
    payload = {"model_params": {"w": torch.zeros(2)}, "training_options": {"x": _Subprocess(marker)}}
    torch.save(payload, bad, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as info:
        import_reference(bad, tmp_path / "out.safetensors")
    assert "global" in str(info.value) and "call" in str(info.value)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_unreadable_or_wrong_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_reference(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_reference(junk)
    other = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), other, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a reference checkpoint"):
        load_reference(other)
