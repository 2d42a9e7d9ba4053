"""The trainer on tiny data sets the tests make themselves (tiny networks, a few steps)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models.train.step as train_mod
from models.data.sources import data_reference, portable_path
from models.errors import BadParameterError
from models.store.checkpoint import load_checkpoint, load_tensors, read_metadata
from models.train.config import TrainConfig, metrics_path, portable_command, resume_path
from models.train.data import epoch_batches, load_splits
from models.train.distributed import DistInfo
from models.train.loop import train
from models.train.process import flushing_denormals
from models.train.run import stored_config
from models.train.schedules import LRSchedule, default_milestones

TINY = dict(arch="preact_resnet", depth=8, width=4, batch_size=8, lr=0.05, ara_n=0, progress=False)


def make_folder(root: Path, n_per_class=20, size=32, classes=("cat", "dog")) -> Path:
    rng = np.random.default_rng(1)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            arr[:, : size // 2, ci] = 255
            Image.fromarray(arr).save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture
def npz(tmp_path, tiny_medmnist) -> Path:
    return tiny_medmnist(tmp_path / "tinymnist.npz")


def cfg_for(data: Path, out: Path, **kw) -> TrainConfig:
    args = dict(TINY)
    args.update(kw)
    return TrainConfig(data=str(data), out=str(out), **args)


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_tensors(resume_path(out)).items() if k.startswith(("model.", "optim."))}


# ----------------------------------------------------------------------------- schedules


def test_onecycle_matches_torch_onecyclelr():
    steps_per_epoch, epochs, lr = 7, 3, 0.2
    sched = LRSchedule("onecycle", lr, epochs, steps_per_epoch)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ref = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, cycle_momentum=False
    )
    for t in range(epochs * steps_per_epoch):
        assert sched(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        ref.step()


def test_step_schedule_is_the_reference_at_200_epochs_and_cosine_decays_to_zero():
    assert default_milestones(200) == [170, 195]
    s = LRSchedule("step", 0.1, 200, 10)
    assert s(169 * 10 + 9) == pytest.approx(0.1)
    assert s(170 * 10) == pytest.approx(0.01)
    assert s(195 * 10) == pytest.approx(0.001)
    c = LRSchedule("cosine", 0.1, 4, 5, warmup_epochs=1)
    assert c(0) == pytest.approx(0.02) and c(4) == pytest.approx(0.1)
    assert c(5) == pytest.approx(0.1) and c(19) < 0.002
    vals = [c(t) for t in range(5, 20)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


# ----------------------------------------------------------------------------- data


def test_npz_uses_its_val_split_and_test_split(npz):
    splits = load_splits(cfg_for(npz, npz.parent / "o.safetensors"))
    assert len(splits.train) == 32 and len(splits.val) == 8 and len(splits.test) == 8
    assert splits.val_source.endswith(":val") and splits.test_source.endswith(":test")
    assert splits.train.kind == "medical" and splits.train.in_channels == 1


def test_train_tar_finds_sibling_test_tar_and_validates_on_a_seeded_test_subset(tmp_path):
    def write_tar(path: Path, split: str, n: int):
        with tarfile.open(path, "w") as tf:
            for c in ("a", "b"):
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((32, 32, 3), 40 if c == "a" else 200, np.uint8)).save(buf, "JPEG")
                    info = tarfile.TarInfo(f"{split}/{c}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tf.addfile(info, buf)

    write_tar(tmp_path / "train.tar", "train", 6)
    write_tar(tmp_path / "test.tar", "test", 5)
    splits = load_splits(cfg_for(tmp_path / "train.tar", tmp_path / "o.safetensors", val_n=4))
    assert len(splits.train) == 12 and len(splits.test) == 10 and len(splits.val) == 4
    assert splits.test_source == str(tmp_path / "test.tar")


def test_folder_without_splits_holds_out_a_seeded_part(tmp_path):
    root = make_folder(tmp_path / "imgs")
    splits = load_splits(cfg_for(root, tmp_path / "o.safetensors", holdout=0.1))
    assert len(splits.train) == 36 and len(splits.val) == 4 and splits.test is splits.val
    assert splits.train.kind == "natural" and splits.train.classes == ["cat", "dog"]


def test_epoch_batches_split_the_permutation_like_distributed_sampler():
    one = epoch_batches(40, 8, epoch=3, seed=5, info=DistInfo())
    assert sorted(torch.cat(one).tolist()) == list(range(40))
    r0 = epoch_batches(40, 4, 3, 5, DistInfo(0, 2))
    r1 = epoch_batches(40, 4, 3, 5, DistInfo(1, 2))
    assert len(r0) == len(r1) == 5
    assert sorted(torch.cat(r0 + r1).tolist()) == list(range(40))
    assert not torch.equal(torch.cat(one), torch.cat(epoch_batches(40, 8, 4, 5, DistInfo())))


# ----------------------------------------------------------------------------- training


def test_robust_run_writes_checkpoint_resume_state_and_metrics_log(npz, tmp_path):
    out = tmp_path / "run" / "net.safetensors"
    run = train(cfg_for(npz, out, robust=True, epochs=2, schedule="onecycle"))
    model, meta = load_checkpoint(out)
    assert meta.arch_args["activation"] == "hhrelu" and meta.arch_args["zero_init_residual"] is False
    assert meta.classes == ["0", "1"] and meta.in_channels == 1 and meta.input_size == 28
    assert meta.psi_state["S"] == run.psi.S and meta.psi_state["psi0"] == 220.0
    assert meta.recipe["robust"] is True and meta.recipe["epochs"] == 2
    assert meta.metrics["epochs_done"] == 2 and meta.metrics["test_n"] == 8
    assert 0.0 <= meta.metrics["test_accuracy"] <= 1.0
    # The served file holds only the network; the resume file adds optimiser and RNG state.
    assert all(k.startswith("model.") for k in load_tensors(out))
    extra = load_tensors(resume_path(out))
    assert any(k.startswith("optim.") for k in extra) and "rng.torch_cpu" in extra
    lines = [json.loads(x) for x in metrics_path(out).read_text().splitlines()]
    assert [r["event"] for r in lines] == ["epoch", "epoch", "final"]
    for r in lines[:2]:
        assert {"epoch", "loss", "penalty", "psi", "train_accuracy", "val_accuracy", "seconds"} <= set(r)
        assert r["penalty"] > 0 and r["psi"] >= 220.0
    # The stored mean/std come from the training images (not CIFAR's constants).
    imgs = np.load(npz)["train_images"] / 255.0
    assert meta.mean[0] == pytest.approx(imgs.mean(), abs=1e-5)
    assert meta.std[0] == pytest.approx(imgs.std(), abs=1e-5)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 2)


def test_standard_run_zero_inits_residuals_and_learns(npz, tmp_path):
    out = tmp_path / "std.safetensors"
    run = train(cfg_for(npz, out, epochs=6, lr=0.1, schedule="cosine"))
    meta = read_metadata(out)
    assert meta.arch_args["activation"] == "relu" and meta.arch_args["zero_init_residual"] is True
    assert meta.psi_state is None
    # The bright band is easy: a few epochs separate the classes.
    assert run.history[-1]["loss"] < run.history[0]["loss"]
    assert meta.metrics["test_accuracy"] >= 0.75


def test_existing_output_is_refused_without_resume_or_overwrite(npz, tmp_path):
    out = tmp_path / "x.safetensors"
    train(cfg_for(npz, out, epochs=1))
    # The run's process-wide settings (flushing subnormals) end with it.
    assert not flushing_denormals()
    with pytest.raises(BadParameterError, match="--resume"):
        train(cfg_for(npz, out, epochs=1))
    with pytest.raises(BadParameterError, match="different training options"):
        train(cfg_for(npz, out, epochs=1, lr=0.2, resume=True))


@pytest.mark.parametrize("extra", [dict(robust=True), dict(robust=True, adv_train="l2")], ids=["robust", "robust+adv"])
def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(npz, tmp_path, monkeypatch, extra):
    kw = dict(epochs=2, schedule="onecycle", seed=3, **extra)
    whole = tmp_path / "whole.safetensors"
    run_whole = train(cfg_for(npz, whole, **kw))

    # Kill the second run in the middle of epoch 2 (its third step raises).
    broken = tmp_path / "broken.safetensors"
    real_step = train_mod.train_step
    calls = {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4 + 3:  # 4 steps per epoch
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(npz, broken, **kw))
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert read_metadata(resume_path(broken)).extra["resume"]["epochs_done"] == 1

    run_resumed = train(cfg_for(npz, broken, resume=True, **kw))
    a, b = final_state(whole), final_state(broken)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert run_resumed.psi.S == run_whole.psi.S and run_resumed.psi.psi == run_whole.psi.psi
    assert read_metadata(broken).weights_sha256 == read_metadata(whole).weights_sha256
    log_a = [json.loads(x) for x in metrics_path(whole).read_text().splitlines()]
    log_b = [json.loads(x) for x in metrics_path(broken).read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "images_per_s", "final_eval_seconds")}
    assert [strip(r) for r in log_a] == [strip(r) for r in log_b]


def test_stop_after_then_resume_finishes_the_run(npz, tmp_path):
    out = tmp_path / "s.safetensors"
    run = train(cfg_for(npz, out, epochs=2, stop_after=1))
    assert run.epochs_done == 1 and not run.final
    assert "test_accuracy" not in read_metadata(out).metrics
    run = train(cfg_for(npz, out, epochs=2, resume=True))
    assert run.epochs_done == 2 and "test_accuracy" in read_metadata(out).metrics
    # Resuming a finished run does nothing more.
    before = out.stat().st_mtime_ns
    train(cfg_for(npz, out, epochs=2, resume=True))
    assert out.stat().st_mtime_ns == before


def test_half_and_half_adversarial_batches_perturb_only_the_affected_rows(tmp_path):
    from models.nn.registry import create_model

    torch.manual_seed(0)
    net = create_model("preact_resnet", depth=8, width=4, in_channels=1, num_classes=2, input_size=28)
    x = torch.rand(6, 1, 28, 28)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    affected = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    net.train()
    cfg = TrainConfig(data="", arch="preact_resnet", out="", adv_train="l2")
    x_adv = train_mod.adversarial_examples(net, x, y, cfg, affected)
    assert net.training  # the engine restored training mode
    rms = (x_adv - x).pow(2).flatten(1).mean(1).sqrt()
    assert torch.equal(x_adv[affected == 0], x[affected == 0])
    # Bounded mode with eps 0.01: the affected rows end near the budget.
    assert bool(((rms[affected == 1] > 0.005) & (rms[affected == 1] < 0.0125)).all())
    cfg_min = TrainConfig(data="", arch="preact_resnet", out="", adv_train="l2min")
    x_min = train_mod.adversarial_examples(net, x, y, cfg_min, torch.ones(6))
    assert bool(((x_min - x).pow(2).flatten(1).mean(1).sqrt() <= 0.1 + 1e-6).all())


def test_final_metrics_include_attack_and_btr_ara(npz, tmp_path):
    out = tmp_path / "ara.safetensors"
    train(cfg_for(npz, out, epochs=1, ara_n=4, ara_seed=1776))
    m = read_metadata(out).metrics
    assert m["ara_n"] == 4 and m["ara_seed"] == 1776
    assert m["ara_attack"] >= 0 and m["ara_btr"] >= 0
    assert math.isfinite(m["ara_attack"]) and math.isfinite(m["ara_btr"])


def test_folder_of_pngs_trains_end_to_end(tmp_path):
    root = make_folder(tmp_path / "imgs")
    out = tmp_path / "f.safetensors"
    train(cfg_for(root, out, epochs=1, robust=True, input_size=28))
    meta = read_metadata(out)
    assert meta.input_size == 28 and meta.in_channels == 3 and meta.classes == ["cat", "dog"]
    assert meta.metrics["test_n"] == 4


def test_loader_workers_do_not_change_the_result(npz, tmp_path):
    # Each batch draws from its own seeded generator, so worker processes see the same crops.
    a = train(cfg_for(npz, tmp_path / "w0.safetensors", epochs=1, robust=True, workers=0))
    b = train(cfg_for(npz, tmp_path / "w2.safetensors", epochs=1, robust=True, workers=2))
    for (k, v), (k2, v2) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert a.psi.S == b.psi.S


# ----------------------------------------------------------------------------- recorded paths


def metadata_strings(obj, key=""):
    """(key path, string) for every string in a metadata document (keys included)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{key}.{k}", str(k)
            yield from metadata_strings(v, f"{key}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from metadata_strings(v, f"{key}[{i}]")
    elif isinstance(obj, str):
        yield key, obj


def test_paths_are_recorded_as_typed_when_relative_else_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.npz").write_bytes(b"abc")
    assert portable_path("d/x.npz") == "d/x.npz" and portable_path("./d/../d/x.npz") == "./d/../d/x.npz"
    for climbing in ("/srv/data/x.npz", "../shared/data/x.npz", "d/../../x.npz", "~/x.npz"):
        assert portable_path(climbing) == "x.npz", climbing
    sha = hashlib.sha256(b"abc").hexdigest()
    assert data_reference("d/x.npz") == {"path": "d/x.npz", "sha256": sha}
    assert data_reference(str(tmp_path / "d" / "x.npz")) == {"name": "x.npz", "sha256": sha}
    folder = data_reference(str(tmp_path / "d"))
    assert folder["name"] == "d" and len(folder["listing_sha256"]) == 64 and "sha256" not in folder
    assert data_reference("missing.npz") == {"path": "missing.npz"}
    cmd = (
        f"/opt/venv/bin/aex train --data {tmp_path}/d/x.npz --out=/home/u/runs/r.safetensors "
        "--val-data d/../../v.npz --test-data ../t.tar --lr 0.1 --out runs/r.safetensors"
    )
    assert portable_command(cmd) == (
        "aex train --data x.npz --out=r.safetensors --val-data v.npz --test-data t.tar --lr 0.1 --out runs/r.safetensors"
    )


def test_checkpoint_metadata_holds_no_path_of_the_machine_that_trained_it(npz, tmp_path):
    out = tmp_path / "run" / "abs.safetensors"
    command = f"aex train --data {npz} --test-data {npz} --out {out} --epochs 1"
    train(cfg_for(npz, out, test_data=str(npz), epochs=1, ara_n=4, command=command))
    sha = hashlib.sha256(npz.read_bytes()).hexdigest()
    for path in (out, resume_path(out)):
        meta = json.loads(read_metadata(path).to_json())
        assert {"recipe", "metrics", "extra"} <= set(meta)
        for key, text in metadata_strings(meta):
            assert str(tmp_path) not in text and not text.startswith("/"), (path.name, key, text)
        recipe, metrics = meta["recipe"], meta["metrics"]
        assert recipe["data"] == recipe["test_data"] == "tinymnist.npz" and recipe["out"] == "abs.safetensors"
        assert (
            recipe["command"]
            == "aex train --data tinymnist.npz --test-data tinymnist.npz --out abs.safetensors --epochs 1"
        )
        # The data set's name and sha256; the test split came from the same file.
        assert recipe["data_refs"] == {"data": {"name": "tinymnist.npz", "sha256": sha}}
        assert metrics["test_source"] == "tinymnist.npz" and metrics["val_source"] == "tinymnist.npz:val"
    assert read_metadata(out).metrics["ara_radii"]["data"] == "tinymnist.npz"


def test_sibling_test_file_is_recorded_by_name_and_sha256(tmp_path):
    root = make_folder(tmp_path / "train")
    make_folder(tmp_path / "test", n_per_class=4)
    out = tmp_path / "sib.safetensors"
    train(cfg_for(root, out, epochs=1, input_size=28, val_n=4))
    meta = read_metadata(out)
    refs = meta.recipe["data_refs"]
    assert refs["data"]["name"] == "train" and refs["test_data"]["name"] == "test"
    assert len(refs["test_data"]["listing_sha256"]) == 64
    assert meta.metrics["test_source"] == "test" and meta.metrics["val_source"] == "test[seeded 4 of 8]"
    assert all(str(tmp_path) not in text for _, text in metadata_strings(json.loads(meta.to_json())))


def test_resume_finds_data_recorded_by_name_only_by_its_sha256_or_asks_for_it(tiny_medmnist, tmp_path):
    for folder in ("runs", "elsewhere", "moved"):
        (tmp_path / folder).mkdir()
    data = tiny_medmnist(tmp_path / "runs" / "tiny.npz", 16, 4, 4)
    out = tmp_path / "runs" / "r.safetensors"
    train(cfg_for(data, out, epochs=2, stop_after=1))
    assert read_metadata(resume_path(out)).recipe["data"] == "tiny.npz"
    # Beside the checkpoint, with the recorded sha256: found (`aex train --out C --resume`).
    assert stored_config(out).data == str(data)
    # The same name with other content is refused.
    other = tiny_medmnist(tmp_path / "elsewhere" / "tiny.npz", 16, 4, 4, seed=7)
    with pytest.raises(BadParameterError, match="different data"):
        train(cfg_for(other, out, epochs=2, resume=True))
    # Moved away, and another file of its name beside the checkpoint: not taken for it.
    moved = tmp_path / "moved" / "tiny.npz"
    data.rename(moved)
    data.write_bytes(other.read_bytes())
    assert stored_config(out).data == "tiny.npz"
    with pytest.raises(BadParameterError, match="--data PATH"):
        train(TrainConfig(**{**stored_config(out).recipe(), "resume": True, "out": str(out)}))
    # Typed again, from wherever it is now, the run goes on.
    run = train(cfg_for(moved, out, epochs=2, resume=True))
    assert run.epochs_done == 2 and "test_accuracy" in read_metadata(out).metrics
