"""`aex train` end to end through the typer app, on a tiny .npz the test makes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from aex.cli import app
from models.store.checkpoint import read_metadata

TINY = [
    "--arch",
    "preact_resnet",
    "--depth",
    "8",
    "--width",
    "4",
    "--batch-size",
    "8",
    "--lr",
    "0.05",
    "--ara-n",
    "0",
    "--no-progress",
    "--schedule",
    "onecycle",
]


def test_train_command_stops_and_resumes_from_out_alone(tmp_path, tiny_medmnist):
    data = tiny_medmnist(tmp_path / "tiny.npz", 24, 6, 6)
    out = tmp_path / "cli.safetensors"
    runner = CliRunner()
    first = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--robust",
            "--epochs",
            "2",
            "--stop-after",
            "1",
            "--psi0",
            "100",
            "--class-weights",
            "balanced",
            *TINY,
        ],
    )
    assert first.exit_code == 0, first.output
    meta = read_metadata(out)
    assert meta.metrics["epochs_done"] == 1 and meta.psi_state["psi0"] == 100.0
    assert meta.recipe["class_weights"] == "balanced" and "--stop-after" in meta.recipe["command"]

    again = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--epochs", "2", *TINY])
    assert again.exit_code == 2 and "--resume" in again.output

    second = runner.invoke(app, ["train", "--out", str(out), "--resume"])
    assert second.exit_code == 0, second.output
    result = json.loads(second.stdout[second.stdout.index("{") :])
    assert result["test_n"] == 6 and 0.0 <= result["test_accuracy"] <= 1.0
    meta = read_metadata(out)
    assert meta.metrics["epochs_done"] == 2 and meta.recipe["robust"] is True
    lines = [json.loads(x) for x in out.with_name("cli.metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in lines if r["event"] == "epoch"] == [1, 2]


def test_train_command_reports_bad_options_as_named_errors(tmp_path, tiny_medmnist):
    data = tiny_medmnist(tmp_path / "tiny.npz", 24, 6, 6)
    runner = CliRunner()
    res = runner.invoke(
        app, ["train", "--data", str(data), "--out", str(tmp_path / "x.safetensors"), "--adv-train", "fgsm", *TINY]
    )
    assert res.exit_code == 2 and "bad_parameter" in res.output and "--adv-train" in res.output
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "y.safetensors")])
    assert res.exit_code == 2 and "--data and --arch are required" in res.output
