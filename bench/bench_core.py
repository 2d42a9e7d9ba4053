"""Benchmark of the science core: one adversarial explanation and one ARA batch.

Run: ``.venv/bin/python bench/bench_core.py [--ara-images N] [--device cuda] [--threads T]``.

Workloads on the CIFAR-10 ResNet-44 (the imported reference ``resnet44-robust`` when
``../shared/data`` is present, else a random HHReLU ResNet-44):

- explanation: one image, targets predicted + runner-up + each of the 10 classes (12
  targets; the engine runs one row per distinct class, so 10 rows) x 35 steps;
- ARA: both searches (l2min and btr, S = 450, eps = 20, k = 1, mu = 0.9) on a batch of
  images (100 on CUDA; 10 on CPU by default, where 100 would take tens of minutes).

Each is reported as seconds and as achieved GFLOP/s, next to the float32 matmul rate
measured on the same device in the same run (so "fraction of matmul rate" says how well
the workload uses the machine). FLOPs per row and step come from torch's FlopCounterMode
on one forward + input-gradient backward; the rows actually searched come from the results
(rows already on the far side of the bound at delta = 0 are dropped by the engine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.defaults import (
    ARA_STEPS,
    EXPLAIN_STEPS,
)
from models.explain.adversarial import Explainer
from models.nn.registry import create_model
from models.nn.runtime import pick_device
from models.perturb.ara import compute_ara

SHARED = Path(os.environ.get("AEX_SHARED_DATA", REPO.parent / "shared" / "data"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, seconds: float = 2.0) -> float:
    """Achieved float32 GFLOP/s of a large square matmul (TF32 off: true float32)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for _ in range(2):
            a @ b
        sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        sync(device)
        dt = time.perf_counter() - t0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * n**3 * reps / dt / 1e9


def step_flops(model: torch.nn.Module, device: torch.device) -> tuple[float, float]:
    """(forward FLOPs, forward + d/d input backward FLOPs) for one 32x32 image."""
    x = torch.rand(1, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    fwd = fc.get_total_flops()
    d = torch.zeros_like(x, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        out = model(x + d)
        torch.autograd.grad(torch.nn.functional.cross_entropy(out, out.argmax(1)), d)
    return float(fwd), float(fc.get_total_flops())


def load_model(device: torch.device):
    ref = SHARED / "reference-checkpoints" / "resnet44-robust.pt"
    if ref.is_file():
        from models.store.checkpoint import load_checkpoint
        from models.store.reference import import_reference

        with tempfile.TemporaryDirectory() as tmp:
            import_reference(ref, Path(tmp) / "robust.safetensors")
            model, meta = load_checkpoint(Path(tmp) / "robust.safetensors", device=device)
        return model, meta.classes, "reference resnet44-robust (imported)"
    torch.manual_seed(0)
    model = create_model("resnet44_cifar", activation="hhrelu").to(device).eval()
    return model, [str(i) for i in range(10)], "random HHReLU ResNet-44 (../shared/data absent)"


def load_images(n: int):
    tar = SHARED / "cifar10-jpeg" / "test.tar"
    if tar.is_file():
        from models.data.datasets import load_dataset
        from models.data.splits import seeded_subset

        ds = load_dataset(tar, "test")
        idx = seeded_subset(len(ds), n, 1776)
        return ds.images[idx], ds.labels[idx], "CIFAR-10 JPEG test, seeded subset (seed 1776)"
    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (n,), generator=g),
        "random images",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--ara-images", type=int, default=None, help="images in the ARA batch (default 100 CUDA / 10 CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    n_ara = args.ara_images or (100 if device.type == "cuda" else 10)

    model, classes, model_desc = load_model(device)
    images, labels, data_desc = load_images(max(n_ara, 1))
    fwd, fwd_bwd = step_flops(model, device)
    peak = matmul_gflops(device)

    # Explanation: warm up once (kernel selection), then time.
    explainer = Explainer(model, classes, bound_check=False)
    x = images[0].float().div(255.0)
    explainer.explain(x)
    sync(device)
    t0 = time.perf_counter()
    expl = explainer.explain(x)
    sync(device)
    t_expl = time.perf_counter() - t0
    rows = len({t.class_index for t in expl.targets})
    # 1 forward for the probabilities, S steps of fwd+bwd per row, 1 forward per row at the end.
    flops_expl = fwd + rows * (EXPLAIN_STEPS * fwd_bwd + fwd)

    # ARA batch (both searches).
    sync(device)
    t0 = time.perf_counter()
    ara = compute_ara(model, images[:n_ara], labels[:n_ara], batch_size=n_ara, bound_check=False)
    sync(device)
    t_ara = time.perf_counter() - t0
    flops_ara = 0.0
    for r in (ara.attack_r, ara.btr_r):
        active = int((r > 0).sum())  # rows not dropped at delta = 0
        # t = 0 on the whole batch, S - 1 gradient steps and one extra forward on active rows.
        flops_ara += n_ara * fwd_bwd + active * ((ARA_STEPS - 1) * fwd_bwd + fwd)

    def rate(flops: float, sec: float) -> dict:
        g = flops / sec / 1e9
        return {
            "seconds": round(sec, 3),
            "gflop": round(flops / 1e9, 1),
            "gflop_per_s": round(g, 1),
            "fraction_of_matmul_rate": round(g / peak, 3),
        }

    report = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "model": model_desc,
        "data": data_desc,
        "flops_per_image": {"forward": fwd, "forward_plus_input_backward": fwd_bwd},
        "matmul_fp32_gflop_per_s": round(peak, 1),
        "cudnn_conv_tf32": bool(torch.backends.cudnn.allow_tf32) if device.type == "cuda" else None,
        "explanation": {"targets": len(expl.targets), "rows": rows, "steps": EXPLAIN_STEPS, **rate(flops_expl, t_expl)},
        "ara_batch": {
            "images": n_ara,
            "searches": 2,
            "steps": ARA_STEPS,
            "accuracy": ara.accuracy,
            "attack_ara": round(ara.attack_ara, 5),
            "btr_ara": round(ara.btr_ara, 5),
            "seconds_per_image": round(t_ara / n_ara, 3),
            **rate(flops_ara, t_ara),
        },
    }
    print(f"device {report['device']} ({report['torch_threads']} threads); model: {model_desc}")
    print(f"float32 matmul: {peak:,.1f} GFLOP/s")
    print(f"ResNet-44 per image: forward {fwd / 1e9:.3f} GFLOP, forward + input gradient {fwd_bwd / 1e9:.3f} GFLOP")
    e, a = report["explanation"], report["ara_batch"]
    print(
        f"explanation ({e['targets']} targets, {e['rows']} rows x {EXPLAIN_STEPS} steps): {e['seconds']:.3f} s, "
        f"{e['gflop_per_s']:,.1f} GFLOP/s = {e['fraction_of_matmul_rate']:.1%} of the matmul rate"
    )
    print(
        f"ARA batch ({n_ara} images, l2min + btr, {ARA_STEPS} steps): {a['seconds']:.2f} s "
        f"({a['seconds_per_image']:.3f} s/image), {a['gflop_per_s']:,.1f} GFLOP/s = "
        f"{a['fraction_of_matmul_rate']:.1%} of the matmul rate"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
