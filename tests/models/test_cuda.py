"""The same code on a CUDA device (skipped where there is none, as on CI): the trainer with
the default and an explicit device, figures that equal the CPU's (plain float32, no TF32),
and explanations that agree with the CPU's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.evaluation.evaluate import evaluate_checkpoint
from models.explain.pipeline import explain_image
from models.nn.runtime import full_precision
from models.store.checkpoint import load_checkpoint
from models.train.config import TrainConfig
from models.train.loop import train
from tests.models.train.test_loop import TINY, make_folder
from tests.support.require import cuda

pytestmark = cuda()
BUNDLED = Path(__file__).resolve().parents[2] / "models" / "checkpoints"


@pytest.mark.parametrize("device", [None, "cuda"], ids=["default", "explicit"])
@pytest.mark.parametrize("robust", [False, True], ids=["standard", "robust"])
def test_trainer_trains_on_cuda(tmp_path, device, robust):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run" / "tiny.safetensors"
    run = train(TrainConfig(data=str(data), out=str(out), epochs=2, robust=robust, device=device, **TINY))
    assert run.device.type == "cuda" and run.epochs_done == 2
    model, meta = load_checkpoint(out)
    assert meta.metrics["epochs_done"] == 2
    if robust:
        assert meta.psi_state is not None


def test_bundled_accuracy_on_cuda_equals_the_recorded_cpu_figure(cifar_test_tar):
    """cifar10-standard has a test image that TF32 convolutions flip: the GPU must measure
    exactly what the CPU recorded."""
    path = BUNDLED / "cifar10-standard" / "model.safetensors"
    _, meta = load_checkpoint(path)
    got = evaluate_checkpoint(path, cifar_test_tar, device="cuda")
    assert got["device"].startswith("cuda") and got["n"] == 10_000
    assert got["accuracy"] == meta.metrics["test_accuracy"]
    assert torch.backends.cudnn.allow_tf32  # restored afterwards


def test_explanations_on_cuda_agree_with_cpu():
    model, meta = load_checkpoint(BUNDLED / "cifar10-robust" / "model.safetensors")
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    cpu = explain_image(model, meta.classes, x, ["predicted", "runner-up"], rho=0.1, steps=35).summary
    with full_precision():  # TF32 would round the search's convolutions differently from the CPU
        explained = explain_image(model.cuda(), meta.classes, x, ["predicted", "runner-up"], rho=0.1, steps=35)
    gpu, files = explained.summary, explained.png_files()
    assert gpu["predicted"] == cpu["predicted"]
    for a, b in zip(cpu["targets"], gpu["targets"]):
        assert a["class_index"] == b["class_index"]
        assert b["rms"] == pytest.approx(a["rms"], rel=0.02)
        assert b["prob_after"] == pytest.approx(a["prob_after"], abs=0.02)
    assert files["gradcam_overlay.png"][:4] == b"\x89PNG"
