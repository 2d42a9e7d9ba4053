"""The science-core commands of ``aex`` (import-reference, evaluate, explain) end to end."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from aex.cli import app
from models.data.datasets import load_dataset
from models.data.splits import seeded_subset
from models.store.checkpoint import CheckpointMeta, save_checkpoint
from tests.support.checkpoints import make_tiny_model

runner = CliRunner()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = make_tiny_model("hhrelu", seed=3, num_classes=2)
    meta = CheckpointMeta(
        arch="preact_resnet",
        arch_args=dict(depth=8, width=4, num_classes=2, input_size=32, activation="hhrelu"),
        classes=["cat", "dog"],
        input_size=32,
        in_channels=3,
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model, meta)
    return path, model


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / c / f"{i:04d}.png")
    return tmp_path / "data"


def test_explain_writes_images_and_summary(tiny_checkpoint, folder, tmp_path):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "expl"
    res = runner.invoke(
        app,
        [
            "explain",
            str(folder / "cat" / "0000.png"),
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--layer",
            "pipe.3",
            "--no-bound-check",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert [t["role"] for t in summary["targets"]] == ["predicted", "runner-up", "class", "class"]
    assert [t["class_name"] for t in summary["targets"][2:]] == ["cat", "dog"]
    assert summary["gradcam"]["layer"] == "pipe.3"
    for t in summary["targets"]:
        assert t["prob_after"] > t["prob_before"]
        for key in ("image", "difference"):
            assert Image.open(out / t[key]).size == (32, 32)
    for name in ("input.png", "gradcam.png", "gradcam_overlay.png"):
        assert Image.open(out / name).size == (32, 32)
    printed = json.loads(res.stdout)
    assert printed["predicted"]["class_name"] in ("cat", "dog")


def test_evaluate_accuracy_and_ara_on_a_seeded_subset(tiny_checkpoint, folder, tmp_path):
    ckpt, model = tiny_checkpoint
    plot = tmp_path / "ara.png"
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(folder),
            "--n",
            "5",
            "--seed",
            "3",
            "--ara",
            "--plot",
            str(plot),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 5 and out["seed"] == 3 and out["checkpoint"] == str(ckpt)
    ds = load_dataset(folder, "test")
    idx = seeded_subset(len(ds), 5, 3)
    with torch.no_grad():
        pred = model(ds.images[idx].float() / 255).argmax(1)
    assert out["accuracy"] == pytest.approx((pred == ds.labels[idx]).float().mean().item())
    assert out["attack_ara"] >= 0 and out["btr_ara"] >= 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_plot_without_ara(tiny_checkpoint, folder, tmp_path):
    ckpt, _ = tiny_checkpoint
    res = runner.invoke(
        app, ["evaluate", "--checkpoint", str(ckpt), "--data", str(folder), "--plot", str(tmp_path / "x.png")]
    )
    assert res.exit_code == 2 and "--ara" in res.output


def test_evaluate_record_stores_the_whole_split_accuracy(tiny_checkpoint, folder):
    ckpt, _ = tiny_checkpoint
    from models.store.checkpoint import load_checkpoint, read_metadata

    before = read_metadata(ckpt)
    res = runner.invoke(
        app, ["evaluate", "--checkpoint", str(ckpt), "--data", str(folder), "--n", "5", "--record", "--no-progress"]
    )
    assert res.exit_code == 2 and "whole split" in res.output  # a subset's accuracy is not the test accuracy
    assert read_metadata(ckpt).metrics == before.metrics
    res = runner.invoke(
        app,
        ["evaluate", "--checkpoint", str(ckpt), "--data", str(folder), "--record", "--device", "cpu", "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    meta = read_metadata(ckpt)
    assert out["recorded"] and out["n"] == 8
    assert meta.metrics["test_accuracy"] == out["accuracy"] and meta.metrics["test_n"] == 8
    # Recorded without the machine's path (issue 8): an absolute folder by its name.
    assert meta.metrics["test_source"] == folder.name and meta.metrics["test_device"] == "cpu"
    assert meta.weights_sha256 == before.weights_sha256
    load_checkpoint(ckpt)  # the weights still match their recorded sha256


def test_evaluate_autoattack_and_sanity_are_recorded_with_n_seed_and_eps(tiny_checkpoint, folder):
    ckpt, _ = tiny_checkpoint
    from models.store.checkpoint import read_metadata

    before = read_metadata(ckpt)
    args = ["evaluate", "--checkpoint", str(ckpt), "--data", str(folder), "--n", "5", "--seed", "3", "--no-progress"]
    res = runner.invoke(app, [*args, "--autoattack"])  # the standard version needs the DLR loss: 4+ classes
    assert res.exit_code == 2 and "DLR" in res.output
    res = runner.invoke(
        app,
        [*args, "--autoattack", "--autoattack-attacks", "apgd-ce", "--sanity", "--sanity-n", "2", "--faithfulness"]
        + ["--record"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    aa, sanity = out["autoattack"], out["sanity"]
    assert aa["n"] == 5 and aa["seed"] == 3 and aa["eps"] == pytest.approx(0.5) and aa["attacks"] == ["apgd-ce"]
    assert 0.0 <= aa["robust_accuracy"] <= aa["clean_accuracy"] == out["accuracy"]
    assert sanity["n"] == 2 and sanity["subset_seed"] == 3 and len(sanity["stages"]) == 4
    meta = read_metadata(ckpt)
    m = meta.metrics
    assert m["autoattack_accuracy"] == aa["robust_accuracy"] and m["autoattack_n"] == 5 and m["autoattack_seed"] == 3
    assert m["autoattack_settings"]["eps"] == pytest.approx(0.5) and m["autoattack_settings"]["package"]
    assert m["sanity_check"]["stages"] == sanity["stages"] and m["sanity_check"]["n"] == 2
    assert m["sanity_adversarial_spearman"] == sanity["stages"][-1]["adversarial"]["spearman"]["mean"]
    assert m["faithfulness"]["gradcam"] == out["faithfulness"]["gradcam"] and m["faithfulness"]["seed"] == 3
    assert m["faithfulness"]["n"] == 5 and m["faithfulness"]["settings"]["steps"] == 16
    assert "test_accuracy" not in m  # a subset's accuracy is not recorded as the test accuracy
    assert meta.weights_sha256 == before.weights_sha256


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_import_reference_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"model_params": _Evil(marker)}, protocol=2))
    res = runner.invoke(app, ["import-reference", str(bad), str(tmp_path / "out.safetensors")])
    assert res.exit_code == 2 and "unsafe_checkpoint" in res.output and "system" in res.output
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_import_reference_command(reference_checkpoints, tmp_path):
    res = runner.invoke(
        app,
        ["import-reference", str(reference_checkpoints / "resnet44-robust.pt"), str(tmp_path / "robust.safetensors")],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["activation"] == "hhrelu" and out["psi_state"]["psi"] == pytest.approx(33778, rel=1e-3)


def test_explain_target_list_and_errors(tiny_checkpoint, folder, tmp_path):
    ckpt, _ = tiny_checkpoint
    img = str(folder / "dog" / "0001.png")
    res = runner.invoke(
        app,
        [
            "explain",
            img,
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path / "a"),
            "-t",
            "dog,1",
            "-t",
            "runner-up",
            "--no-bound-check",
            "--clamp",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert [(t["role"], t["class_name"]) for t in summary["targets"]][:2] == [("class", "dog"), ("class", "dog")]
    assert summary["settings"]["clamp"] is True
    bad = runner.invoke(app, ["explain", img, "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "-t", "zebra"])
    assert bad.exit_code == 2 and "unknown target" in bad.output
    missing = runner.invoke(
        app, ["explain", img, "--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "c")]
    )
    assert missing.exit_code == 2 and "not found" in missing.output
