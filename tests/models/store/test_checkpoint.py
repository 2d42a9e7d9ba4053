import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.errors import CheckpointError
from models.nn.registry import create_model
from models.store.checkpoint import CheckpointMeta, load_checkpoint, read_metadata, save_checkpoint

ARGS = dict(depth=8, width=4, num_classes=3, input_size=32, activation="hhrelu")


def make_meta() -> CheckpointMeta:
    return CheckpointMeta(
        arch="preact_resnet",
        arch_args=dict(ARGS),
        classes=["a", "b", "c"],
        input_size=32,
        in_channels=3,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        recipe={"epochs": 1},
        psi_state={"S": 1.0, "psi": 224.4},
        metrics={"accuracy": 0.5, "n": 10, "seed": 1},
    )


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("preact_resnet", **ARGS, zero_init_residual=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "net.safetensors"
    save_checkpoint(path, model, make_meta())
    return model, path


def test_round_trip_gives_the_same_logits(saved):
    model, path = saved
    loaded, meta = load_checkpoint(path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert meta.classes == ["a", "b", "c"] and meta.psi_state["psi"] == 224.4 and meta.metrics["seed"] == 1
    assert not loaded.training and len(meta.weights_sha256) == 64


def test_refuses_a_pickle(tmp_path):
    path = tmp_path / "net.safetensors"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=2))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)
    zipped = tmp_path / "zip.safetensors"
    torch.save({"w": torch.zeros(2)}, zipped)
    with pytest.raises(CheckpointError, match="zip"):
        load_checkpoint(zipped)


def test_refuses_a_truncated_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in (4, 200, len(data) - 100):
        short = tmp_path / f"short{cut}.safetensors"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_checkpoint(short)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_refuses_safetensors_without_aex_metadata(saved, tmp_path):
    _, path = saved
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(path)), str(plain))
    with pytest.raises(CheckpointError, match="no aex metadata"):
        load_checkpoint(plain)


def test_refuses_metadata_missing_a_required_key(saved, tmp_path):
    _, path = saved
    meta = json.loads(json.dumps(read_metadata(path).__dict__))
    del meta["classes"]
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={"aex": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="classes"):
        load_checkpoint(bad)


def test_refuses_tampered_weights(saved, tmp_path):
    _, path = saved
    tensors = load_file(str(path))
    tensors["model.pipe.0.weight"][0, 0, 0, 0] += 1e-3
    bad = tmp_path / "tampered.safetensors"
    save_file(tensors, str(bad), metadata={"aex": read_metadata(path).to_json()})
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(bad)
    load_checkpoint(bad, verify=False)  # the check is what refuses it


def test_refuses_weights_that_do_not_fit_the_architecture(saved, tmp_path):
    _, path = saved
    tensors = load_file(str(path))
    meta = read_metadata(path)
    renamed = {k.replace("pipe.7.bias", "pipe.7.offset"): v for k, v in tensors.items()}
    bad = tmp_path / "renamed.safetensors"
    save_file(renamed, str(bad), metadata={"aex": meta.to_json()})
    with pytest.raises(CheckpointError, match="do not fit|sha256"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(bad, verify=False)
    # Metadata naming another architecture than the weights were saved from.
    meta.arch_args = dict(ARGS, depth=14)
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={"aex": meta.to_json()})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(other)


def test_saved_file_has_the_usual_mode_not_a_private_temporary_one(saved):
    import os
    import stat

    _, path = saved
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_class_codes_are_stored_updated_and_an_older_checkpoint_loads_without_them(saved, tmp_path):
    from models.store.checkpoint import update_metadata

    _model, path = saved
    assert read_metadata(path).class_codes == {}  # written without a map: none
    codes = {"a": {"scheme": "SCT", "value": "233604007", "meaning": "Pneumonia"}}
    meta = update_metadata(path, class_codes=codes)
    assert read_metadata(path).class_codes == codes == meta.class_codes
    load_checkpoint(path)  # the weights' sha256 still holds
    # A checkpoint written before class codes existed (no key at all) loads as before.
    tensors = load_file(str(path))
    old = {k: v for k, v in json.loads(make_meta().to_json()).items() if k != "class_codes"}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"aex": json.dumps(old)})
    assert read_metadata(tmp_path / "old.safetensors").class_codes == {}


@pytest.mark.parametrize(
    "codes, fault",
    [
        ({"z": {"scheme": "SCT", "value": "233604007", "meaning": "P"}}, "'z', which is not a class"),
        ({"a": {"scheme": "XX", "value": "1", "meaning": "P"}}, "unknown coding scheme 'XX'"),
        ({"a": {"scheme": "SCT", "value": "233604008", "meaning": "P"}}, "not a valid SCT code"),
        ({"a": {"value": "233604007"}}, "is not {scheme, value, meaning}"),
    ],
)
def test_a_malformed_stored_class_code_map_is_refused(saved, tmp_path, codes, fault):
    _model, path = saved
    tensors = load_file(str(path))
    doc = {**json.loads(make_meta().to_json()), "class_codes": codes}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"aex": json.dumps(doc)})
    with pytest.raises(CheckpointError, match=fault):
        read_metadata(tmp_path / "bad.safetensors")
