"""Every ratio of issue 12 in one run: each workload next to its baseline, measured in the
same process on the same images and machine.

Run: ``.venv/bin/python bench/bench_all.py [--device cpu|cuda|all] [--threads T]
[--reps R] [--ara-images N] [--stability-images N] [--only a,b,...] [--compile]``.

Workloads (the science core; the service's figures have their own function, below):

- explanation: one image, 12 targets (predicted, runner-up, each of the 10 classes) x 35
  steps, ``Explainer.explain`` against ALGORITHMS.md transcribed literally
  (``bench/literal.py``: one row per target, every row every step); agreement: largest
  difference of rms(delta) and of the target's probability after;
- ARA batch: both searches (l2min, btr; S 450, eps 20, k 1, mu 0.9) on a batch of test images,
  ``compute_ara`` against the literal search; the per-image radii (largest difference, must be
  below 1e-4) and the two ARA figures (must be identical);
- Grad-CAM on 64 images: ``models.explain.gradcam`` against the ``grad-cam`` package
  (``pytorch_grad_cam.GradCAM``); agreement: largest difference of the maps;
- robust training step: the trainer's ``train_step`` (cross-entropy plus the input-gradient
  penalty, double back-propagation) against the literal step of ALGORITHMS.md;
- stability score: ``stability_score`` fast against exact (the two 450-step searches) on one
  image: time ratio; and the agreement of the fast radii with the exact radii each bundled
  checkpoint records (``metrics["ara_radii"]``: 100 test images, seed 1776, the exact
  search): per checkpoint and search, n, median and largest relative error, how many images
  are off by more than 15%, and whether the zeros (images already past the bound, radius 0 in
  the record) coincide. Radii are compared on the images whose recorded radius is not zero;
  zeros are compared for equality (the fast search gives 0 exactly where the exact one does:
  both decide it from the same forward pass at delta = 0).

The network of the first four is the paper's robust ResNet-44 (``resnet44-robust``, imported
from ../shared/data/reference-checkpoints) when present, else cifar10-robust from
models/checkpoints. Times are medians of ``--reps`` runs, baseline and ours interleaved (the
machine may be shared: compare ratios, not seconds, across runs). ``--compile`` also times
the searches with ``torch.compile`` (see ``models.nn.runtime.accelerated``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from literal import literal_ara_radii, literal_explanation, literal_robust_step

from models.data.datasets import load_dataset
from models.data.splits import seeded_subset
from models.defaults import (
    ARA_EPS,
    ARA_MOMENTUM,
    ARA_OVERSHOOT,
    ARA_STEPS,
    EXPLAIN_OVERSHOOT,
    EXPLAIN_RHO,
    EXPLAIN_STEPS,
    PSI0,
    ZETA,
    Z,
)
from models.explain.adversarial import Explainer
from models.explain.gradcam import gradcam
from models.nn.registry import create_model
from models.nn.runtime import full_precision
from models.perturb.ara import ara_from_radii, compute_ara
from models.perturb.minimal import minimal_radii
from models.perturb.stability import stability_score
from models.store.checkpoint import load_checkpoint

SHARED = Path(os.environ.get("AEX_SHARED_DATA", REPO.parent / "shared" / "data"))
BUNDLED = REPO / "models" / "checkpoints"
DATA = {
    "cifar10-robust": SHARED / "cifar10-jpeg" / "test.tar",
    "cifar10-standard": SHARED / "cifar10-jpeg" / "test.tar",
    "pneumonia-robust": SHARED / "pneumoniamnist" / "pneumoniamnist.npz",
}
WORKLOADS = ("explanation", "ara", "gradcam", "train", "stability", "service")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], object]], reps: int, device: torch.device, warm: bool = True) -> dict:
    """Median seconds of each function over ``reps`` interleaved rounds (after one untimed
    round when ``warm``), and each function's last result."""
    results = {}
    if warm:
        for name, fn in fns.items():
            results[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            results[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {"seconds": {k: statistics.median(v) for k, v in times.items()}, "results": results}


def ratio_line(label: str, ours: float, base: float, base_name: str, target: float | None, extra: str = "") -> str:
    r = ours / base
    goal = "" if target is None else f" (target <= {target}: {'met' if r <= target else 'NOT met'})"
    return f"{label}: {ours:.3f} s vs {base_name} {base:.3f} s -> ratio {r:.3f}{goal}{extra}"


def load_network(device: torch.device):
    ref = SHARED / "reference-checkpoints" / "resnet44-robust.pt"
    if ref.is_file():
        from models.store.reference import import_reference

        with tempfile.TemporaryDirectory() as tmp:
            import_reference(ref, Path(tmp) / "robust.safetensors")
            model, meta = load_checkpoint(Path(tmp) / "robust.safetensors", device=device)
        return model.eval(), meta.classes, "reference resnet44-robust (imported)"
    model, meta = load_checkpoint(BUNDLED / "cifar10-robust" / "model.safetensors", device=device)
    return model.eval(), meta.classes, "bundled cifar10-robust"


def cifar_images(n: int):
    tar = DATA["cifar10-robust"]
    if tar.is_file():
        ds = load_dataset(tar, "test")
        idx = seeded_subset(len(ds), n, 1776)
        return ds.images[idx], ds.labels[idx], "CIFAR-10 JPEG test, seeded subset (seed 1776)"
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return imgs, torch.randint(0, 10, (n,), generator=g), "random images (../shared/data absent)"


# --- workloads --------------------------------------------------------------------------


def bench_explanation(model, classes, image: torch.Tensor, device, reps: int, compile_: bool) -> dict:
    x = image.to(device)
    explainer = Explainer(model, classes, bound_check=False)
    fns = {
        "literal": lambda: literal_explanation(model, x, EXPLAIN_RHO, EXPLAIN_STEPS, EXPLAIN_OVERSHOOT),
        "engine": lambda: explainer.explain(x),
    }
    if compile_:
        fns["engine_compiled"] = lambda: Explainer(model, classes, bound_check=False, accelerate=True).explain(x)
    out = timed(fns, reps, device)
    targets, delta, after = out["results"]["literal"]
    ours = out["results"]["engine"]
    d_rms = d_prob = 0.0
    for k, t in enumerate(ours.targets):
        assert t.class_index == targets[k]
        d_rms = max(d_rms, abs(t.rms - float(delta[k].pow(2).mean().sqrt())))
        d_prob = max(d_prob, abs(t.prob_after - float(after[k, targets[k]])))
    s = out["seconds"]
    res = {
        "targets": len(targets),
        "rows_literal": len(targets),
        "rows_engine": len({t.class_index for t in ours.targets}),
        "seconds": s,
        "ratio": s["engine"] / s["literal"],
        "max_abs_diff_rms": d_rms,
        "max_abs_diff_prob_after": d_prob,
    }
    print(
        ratio_line(
            "explanation (12 targets x 35 steps)",
            s["engine"],
            s["literal"],
            "literal",
            0.5,
            f"; rms differs by <= {d_rms:.2e}, p_after by <= {d_prob:.2e}",
        )
    )
    if compile_:
        res["ratio_compiled"] = s["engine_compiled"] / s["literal"]
        print(
            ratio_line(
                "explanation, engine with torch.compile (warm)", s["engine_compiled"], s["literal"], "literal", 0.5
            )
        )
    return res


def bench_ara(model, images, labels, device) -> dict:
    x = images.to(device).float() / 255.0
    y = labels.to(device)
    n = x.shape[0]
    fns = {
        "literal": lambda: literal_ara_radii(model, x, y, ARA_STEPS, ARA_EPS, ARA_OVERSHOOT, ARA_MOMENTUM),
        "engine": lambda: compute_ara(model, x, y, batch_size=n, bound_check=False),
    }
    out = timed(fns, 1, device, warm=False)
    lit, ara = out["results"]["literal"], out["results"]["engine"]
    num_classes = 10
    diffs = {}
    figures = {}
    for name, ours in (("attack", ara.attack_r), ("btr", ara.btr_r)):
        theirs = lit[name].double().cpu().numpy()
        diffs[name] = float(abs(ours - theirs).max())
        figures[name] = (ara_from_radii(ours, num_classes), ara_from_radii(theirs, num_classes))
    identical = all(a == b for a, b in figures.values())
    s = out["seconds"]
    print(
        ratio_line(
            f"ARA batch ({n} images, l2min + btr, {ARA_STEPS} steps)",
            s["engine"],
            s["literal"],
            "literal",
            0.7,
            f"; radii differ by <= {max(diffs.values()):.2e} (attack {diffs['attack']:.2e}, btr {diffs['btr']:.2e}); "
            f"ARA figures {'identical' if identical else 'DIFFER'}: attack {figures['attack'][0]:.6f}, btr {figures['btr'][0]:.6f}",
        )
    )
    return {
        "images": n,
        "seconds": s,
        "ratio": s["engine"] / s["literal"],
        "max_abs_diff_radii": diffs,
        "ara_engine": {k: v[0] for k, v in figures.items()},
        "ara_literal": {k: v[1] for k, v in figures.items()},
        "ara_identical": identical,
    }


def bench_gradcam(model, images, device, reps: int) -> dict:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = images.to(device).float() / 255.0
    with torch.no_grad():
        classes = model(x).argmax(1).tolist()
    layer = model.gradcam_layer

    def package():
        with GradCAM(model=model, target_layers=[layer]) as cam:
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])

    out = timed({"package": package, "ours": lambda: gradcam(model, x, classes)}, reps, device)
    diff = float(abs(out["results"]["ours"].cpu().numpy() - out["results"]["package"]).max())
    s = out["seconds"]
    print(
        ratio_line(
            f"Grad-CAM ({x.shape[0]} images)",
            s["ours"],
            s["package"],
            "grad-cam package",
            0.25,
            f"; maps differ by <= {diff:.2e}",
        )
    )
    return {"images": x.shape[0], "seconds": s, "ratio": s["ours"] / s["package"], "max_abs_diff": diff}


def bench_train(device, batch: int, reps: int) -> dict:
    from models.train.config import TrainConfig
    from models.train.distributed import DistInfo
    from models.train.penalty import AdaptivePsi
    from models.train.state import step_generator
    from models.train.step import train_step

    torch.manual_seed(0)
    base = create_model("resnet44_cifar", activation="hhrelu", zero_init_residual=False).to(device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    cfg = TrainConfig(data="", arch="resnet44_cifar", out="", robust=True)
    info = DistInfo()
    nets = {k: copy.deepcopy(base) for k in ("literal", "ours")}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4) for k, m in nets.items()}
    psi = AdaptivePsi()
    count = [0]

    def ours():
        count[0] += 1
        return train_step(
            nets["ours"],
            nets["ours"],
            opts["ours"],
            x.clone(),
            y,
            cfg,
            psi,
            0.01,
            step_generator(0, "bench", count[0]),
            info,
        )

    def literal():
        return literal_robust_step(
            nets["literal"], opts["literal"], x, y, PSI0, ZETA, Z, step_generator(0, "bench", count[0])
        )

    out = timed({"literal": literal, "ours": ours}, reps, device)
    s = out["seconds"]
    print(ratio_line(f"robust training step (ResNet-44, batch {batch})", s["ours"], s["literal"], "literal", 0.9))
    return {"batch": batch, "seconds": s, "ratio": s["ours"] / s["literal"]}


def bench_stability(device, n_images: int, timing_checkpoints: list[str], compile_: bool) -> dict:
    out: dict = {}
    for name, data in DATA.items():
        path = BUNDLED / name / "model.safetensors"
        if not path.is_file():
            continue
        model, meta = load_checkpoint(path, device=device)
        model.eval()
        record = meta.metrics.get("ara_radii") or {}
        entry: dict = {}
        if data.is_file() and record:
            ds = load_dataset(data, "test", meta.input_size, meta.in_channels)
            n = min(n_images, int(record["n"]))
            idx = seeded_subset(len(ds), int(record["n"]), int(record["seed"]))[:n]
            x = ds.images[idx].float() / 255.0
            y = ds.labels[idx]
            t0 = time.perf_counter()
            radii = {"attack": [], "btr": []}
            for start in range(0, n, 8):  # 8 images = 16 rows: as the service runs a score (NHWC)
                res = minimal_radii(model, x[start : start + 8], y[start : start + 8], mode="fast")
                for k in radii:
                    radii[k].append(res.rms[k])
            entry["fast_seconds_all_images"] = time.perf_counter() - t0
            for k in ("attack", "btr"):
                fast = torch.cat(radii[k])
                stored = torch.tensor(record[k][:n], dtype=torch.float64)
                nz = stored > 0
                rel = (fast[nz] / stored[nz] - 1).abs()
                entry[k] = {
                    "n_images": n,
                    "n_compared": int(nz.sum()),
                    "zeros_in_record": int((~nz).sum()),
                    "zeros_coincide": bool(torch.equal(fast == 0, stored == 0)),
                    "median_rel_err": float(rel.median()),
                    "max_rel_err": float(rel.max()),
                    "over_15pct": int((rel > 0.15).sum()),
                    "over_5pct": int((rel > 0.05).sum()),
                }
                e = entry[k]
                print(
                    f"stability agreement {name} {k}: n={e['n_compared']} compared (of {n}; {e['zeros_in_record']} zeros "
                    f"in the record, {'all' if e['zeros_coincide'] else 'NOT all'} zero in fast too): median rel err "
                    f"{e['median_rel_err']:.4f} (target <= 0.05: {'met' if e['median_rel_err'] <= 0.05 else 'NOT met'}), "
                    f"max {e['max_rel_err']:.4f} (target <= 0.15: {'met' if e['max_rel_err'] <= 0.15 else 'NOT met'}; "
                    f"{e['over_15pct']} images over 15%, {e['over_5pct']} over 5%)",
                    flush=True,
                )
            if name in timing_checkpoints:
                # One correctly classified image of the subset: the score of a reviewer's image.
                with torch.no_grad():
                    pred = model(x.to(device)).argmax(1).cpu()
                i = int((pred == y).nonzero()[0])
                image = x[i]
        elif name in timing_checkpoints:
            image = torch.rand(
                meta.in_channels, meta.input_size, meta.input_size, generator=torch.Generator().manual_seed(0)
            )
        if name in timing_checkpoints:
            fns = {
                m: (lambda m=m, model=model, image=image: stability_score(model, image, mode=m))
                for m in ("exact", "fast")
            }
            t = timed(fns, 1, device, warm=False)
            s = t["seconds"]
            entry["timing"] = {
                "seconds": s,
                "ratio": s["fast"] / s["exact"],
                "radii": {k: {m: t["results"][m][f"{k}_rms"] for m in fns} for k in ("attack", "btr")},
            }
            print(
                ratio_line(
                    f"stability score {name}, one image",
                    s["fast"],
                    s["exact"],
                    "exact (2 x 450 steps)",
                    None,
                    "; radii "
                    + ", ".join(
                        f"{k} fast {v['fast']:.5f} exact {v['exact']:.5f}" for k, v in entry["timing"]["radii"].items()
                    ),
                ),
                flush=True,
            )
        out[name] = entry
    return out


def service_figures(args: argparse.Namespace, device: torch.device) -> dict | None:
    """Through ``aex serve`` (started here on a loopback port with the bundled cifar10-robust
    and one worker, unless ``--no-service``): the wall time of an explain job with the default
    settings (predicted and runner-up, Grad-CAM, faithfulness, the stability score) on three
    test images, each next to the time the literal transcription needs, in this process and
    before the service starts, for the same explanation rows plus both 450-step searches on
    that image (the reference's work for the same answer); then classify throughput and
    p50/p95 at 1, 8 and 32 clients with and without dynamic batching, next to the in-process
    batch-1 rate (``bench_service.run``)."""
    if args.no_service or device.type != "cpu":
        return None
    import argparse as _argparse

    import bench_service
    import httpx

    from models.render.png import to_png_bytes

    checkpoint = BUNDLED / "cifar10-robust" / "model.safetensors"
    model, meta = load_checkpoint(checkpoint, device=device)
    model.eval()
    images, _labels, _ = cifar_images(3)
    literal_seconds = []
    for img in images:
        x = img.float().to(device) / 255.0
        t0 = time.perf_counter()
        with torch.no_grad():
            order = model(x[None]).softmax(1)[0].argsort(descending=True)
        rows = order[:2]
        literal_search_rows(model, x, rows)
        literal_ara_radii(model, x[None], order[:1], ARA_STEPS, ARA_EPS, ARA_OVERSHOOT, ARA_MOMENTUM)
        literal_seconds.append(time.perf_counter() - t0)
    del model
    scratch = Path(tempfile.mkdtemp(prefix="aex-bench-all-"))
    threads = torch.get_num_threads()
    # aex serve's own torch threads (one per worker on 2 cores, the other core the API's): the
    # default explain job, whose stability searches then run beside its explanations.
    proc, url, token = bench_service.start_service(checkpoint, "cifar10-robust", 1, None, scratch, 16)
    jobs = []
    try:
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as http:
            for i, img in enumerate(images):
                png = to_png_bytes(img.permute(1, 2, 0).numpy())
                t0 = time.perf_counter()
                resp = http.post("/v1/explain", files={"image": ("x.png", png, "image/png")}, data={})
                view = resp.json()
                while view.get("status") not in ("finished", "failed", "cancelled"):
                    time.sleep(0.02)
                    view = http.get(f"/v1/jobs/{view['id']}").json()
                wall = time.perf_counter() - t0
                timings = view["result"]["provenance"]["timings"] if view.get("result") else {}
                jobs.append({"wall_seconds": wall, "status": view["status"], "timings": timings})
                print(
                    ratio_line(
                        f"explain job through the service, default settings, image {i}",
                        wall,
                        literal_seconds[i],
                        "literal (2 explanation rows + both 450-step searches)",
                        0.15,
                        f"; status {view['status']}, stability mode "
                        f"{(view.get('result') or {}).get('stability', {}).get('settings', {}).get('mode')}",
                    ),
                    flush=True,
                )
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    ratios = [j["wall_seconds"] / t for j, t in zip(jobs, literal_seconds)]
    classify = bench_service.run(
        _argparse.Namespace(
            checkpoint=str(checkpoint),
            url=None,
            token=None,
            model="cifar10-robust",
            workers=1,
            threads=threads,
            clients=args.service_clients,
            max_batch="1,16",
            duration=args.service_duration,
            warmup=2.0,
        )
    )
    return {
        "explain_jobs": jobs,
        "literal_seconds": literal_seconds,
        "explain_ratio_median": statistics.median(ratios),
        "classify": classify,
    }


def literal_search_rows(model, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The literal explain-mode search of ``rows`` (class indices) on one image."""
    from literal import literal_search

    xs = x[None].expand(len(rows), -1, -1, -1)
    return literal_search(model, xs, rows.to(x.device), "explain", EXPLAIN_STEPS, EXPLAIN_RHO, EXPLAIN_OVERSHOOT, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda, or all (default: cpu, and cuda too when present)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds of the short workloads")
    ap.add_argument("--ara-images", type=int, default=None, help="ARA batch (default 10 on CPU, 100 on CUDA)")
    ap.add_argument("--gradcam-images", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=None, help="default 32 on CPU, 128 on CUDA")
    ap.add_argument("--stability-images", type=int, default=100, help="stored images compared per checkpoint")
    ap.add_argument(
        "--stability-timing",
        default="cifar10-robust",
        help="checkpoints whose one-image fast/exact time is measured (comma list, 'all' or 'none')",
    )
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--compile", action="store_true", help="also time the searches under torch.compile")
    ap.add_argument("--no-service", action="store_true", help="skip the figures through a running aex serve")
    ap.add_argument("--service-clients", default="1,8,32", help="client counts of the classify load")
    ap.add_argument("--service-duration", type=float, default=8.0, help="seconds measured per classify load")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    if args.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    elif args.device == "all":
        devices = [torch.device("cpu"), torch.device("cuda")]
    else:
        devices = [torch.device(args.device)]
    timing = {"all": list(DATA), "none": []}.get(args.stability_timing, args.stability_timing.split(","))

    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "devices": {}}
    for device in devices:
        with full_precision():
            name = (
                torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else f"cpu ({torch.get_num_threads()} threads)"
            )
            print(f"== {name}", flush=True)
            fig: dict = {}
            model, classes, model_desc = load_network(device)
            n_ara = args.ara_images or (100 if device.type == "cuda" else 10)
            images, labels, data_desc = cifar_images(max(n_ara, args.gradcam_images, 1))
            print(f"network: {model_desc}; images: {data_desc}", flush=True)
            if "explanation" in only:
                fig["explanation"] = bench_explanation(
                    model, classes, images[0].float() / 255.0, device, args.reps, args.compile
                )
            if "gradcam" in only:
                fig["gradcam"] = bench_gradcam(model, images[: args.gradcam_images], device, args.reps)
            if "train" in only:
                batch = args.train_batch or (128 if device.type == "cuda" else 32)
                fig["train"] = bench_train(device, batch, args.reps)
            if "ara" in only:
                fig["ara"] = bench_ara(model, images[:n_ara], labels[:n_ara], device)
            if "stability" in only:
                fig["stability"] = bench_stability(device, args.stability_images, timing, args.compile)
            if "service" in only:
                fig["service"] = service_figures(args, device)
            report["devices"][name] = fig
    print(json.dumps(report, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
