"""Finding served checkpoints and reading their metadata without torch."""

from __future__ import annotations

import json
import shutil

import pytest

from models.errors import CheckpointError
from models.store.checkpoint import read_metadata
from models.store.discovery import catalogue_entry, discover_checkpoints
from models.store.header import read_checkpoint_metadata


def test_layouts_are_found_and_trainer_state_is_not(service_models, tmp_path):
    runs = tmp_path / "runs"
    (runs / "pneu").mkdir(parents=True)
    shutil.copy(service_models / "tiny-grey.safetensors", runs / "pneu" / "pneu.safetensors")
    shutil.copy(service_models / "tiny-grey.safetensors", runs / "pneu" / "pneu.resume.safetensors")
    (runs / "notes.txt").write_text("not a checkpoint")
    found = discover_checkpoints([service_models, runs, tmp_path / "missing"])
    assert found == {
        "tiny-rgb": service_models / "tiny-rgb" / "model.safetensors",
        "tiny-grey": service_models / "tiny-grey.safetensors",
        "pneu": runs / "pneu" / "pneu.safetensors",
    }


def test_the_same_name_twice_is_an_error(service_models, tmp_path):
    shutil.copy(service_models / "tiny-grey.safetensors", tmp_path / "tiny-rgb.safetensors")
    with pytest.raises(CheckpointError, match="two checkpoints are served as 'tiny-rgb'"):
        discover_checkpoints([service_models, tmp_path])


def test_header_metadata_equals_the_checkpoint_reader(service_models):
    path = service_models / "tiny-rgb" / "model.safetensors"
    meta = read_checkpoint_metadata(path)
    assert meta == json.loads(read_metadata(path).to_json())
    entry = catalogue_entry("tiny-rgb", path, meta)
    assert entry["num_classes"] == 10 and entry["input_size"] == 32 and entry["file"] == "model.safetensors"
    json.dumps(entry)  # JSON-safe


def test_bad_files_are_refused(service_models, tmp_path):
    good = (service_models / "tiny-grey.safetensors").read_bytes()
    cases = {"truncated": good[:6], "text": b"hello world, this is text", "pickle": b"\x80\x04\x95" + b"\0" * 20}
    for name, data in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError):
            read_checkpoint_metadata(tmp_path / f"{name}.safetensors")
    header = json.dumps({"__metadata__": {"other": "x"}}).encode()
    (tmp_path / "plain.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match="no aex metadata"):
        read_checkpoint_metadata(tmp_path / "plain.safetensors")
