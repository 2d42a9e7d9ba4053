"""`aex checkpoint codes` and `aex train --class-code`: a class -> code map set, shown, changed and refused precisely, through the typer app."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from aex.cli import app
from models.nn.registry import create_model
from models.store.checkpoint import CheckpointMeta, load_checkpoint, read_metadata, save_checkpoint
from tests.aex.commands.test_train import TINY

PNEUMONIA = "pneumonia=SCT:233604007:Pneumonia"
NORMAL = "normal=SCT:17621005:Normal"


def tiny_checkpoint(path):
    args = dict(depth=8, width=4, num_classes=2, input_size=28, in_channels=1)
    model = create_model("preact_resnet", **args)
    meta = CheckpointMeta("preact_resnet", args, ["normal", "pneumonia"], 28, 1, [0.5], [0.25])
    save_checkpoint(path, model, meta)
    return path


def output_json(result) -> dict:
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_codes_are_shown_set_changed_and_removed(tmp_path):
    path = tiny_checkpoint(tmp_path / "net.safetensors")
    weights = read_metadata(path).weights_sha256
    runner = CliRunner()
    shown = runner.invoke(app, ["checkpoint", "codes", str(path)])
    assert shown.exit_code == 0, shown.output
    assert output_json(shown)["class_codes"] == {} and output_json(shown)["classes"] == ["normal", "pneumonia"]

    done = runner.invoke(app, ["checkpoint", "codes", str(path), PNEUMONIA, NORMAL])
    assert done.exit_code == 0, done.output
    codes = read_metadata(path).class_codes
    assert codes["pneumonia"] == {"scheme": "SCT", "value": "233604007", "meaning": "Pneumonia"}
    assert codes["normal"]["value"] == "17621005"
    _model, meta = load_checkpoint(path)  # still loads, the weights' sha256 checked
    assert meta.weights_sha256 == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.safetensors"]  # no temporary file left

    assert runner.invoke(app, ["checkpoint", "codes", str(path), "normal="]).exit_code == 0
    assert set(read_metadata(path).class_codes) == {"pneumonia"}
    assert runner.invoke(app, ["checkpoint", "codes", str(path), "--replace", NORMAL]).exit_code == 0
    assert set(read_metadata(path).class_codes) == {"normal"}


def test_a_bad_code_is_refused_and_the_checkpoint_left_as_it_was(tmp_path):
    path = tiny_checkpoint(tmp_path / "net.safetensors")
    before = path.read_bytes()
    runner = CliRunner()
    for args, fault in (
        (["pneumonia=ICD10:J18:Pneumonia"], "unknown coding scheme 'ICD10'; aex accepts DCM, LN, RADLEX, SCT"),
        (["pneumonia=SCT:233604008:Pneumonia"], "'233604008' is not a valid SCT code"),
        (["effusion=SCT:233604007:Pneumonia"], "'effusion' is not a class of the model (normal, pneumonia)"),
        ([PNEUMONIA, "normal"], "is not NAME=SCHEME:VALUE:MEANING"),
    ):
        result = runner.invoke(app, ["checkpoint", "codes", str(path), *args])
        assert result.exit_code == 2 and "bad_parameter" in result.output and fault in result.output, result.output
    assert path.read_bytes() == before


def test_train_stores_the_class_codes_and_refuses_a_bad_one_before_training(tmp_path, tiny_medmnist):
    data = tiny_medmnist(tmp_path / "pneumoniamnist.npz", 16, 4, 4)  # classes normal, pneumonia
    runner = CliRunner()
    out = tmp_path / "bad.safetensors"
    bad = runner.invoke(
        app, ["train", "--data", str(data), "--out", str(out), "--class-code", "pneumonia=SNOMED:1:P", *TINY]
    )
    assert bad.exit_code == 2 and "unknown coding scheme 'SNOMED'" in bad.output, bad.output
    assert not out.exists()
    wrong = runner.invoke(
        app, ["train", "--data", str(data), "--out", str(out), "--class-code", "effusion=SCT:233604007:P", *TINY]
    )
    assert wrong.exit_code == 2 and "'effusion' is not a class" in wrong.output, wrong.output
    assert not out.exists()

    out = tmp_path / "good.safetensors"
    good = runner.invoke(
        app,
        ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--class-code", PNEUMONIA, *TINY],
    )
    assert good.exit_code == 0, good.output
    meta = read_metadata(out)
    assert meta.class_codes == {"pneumonia": {"scheme": "SCT", "value": "233604007", "meaning": "Pneumonia"}}
    assert meta.recipe["class_code"] == [PNEUMONIA] and "--class-code" in meta.recipe["command"]
