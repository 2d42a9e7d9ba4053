"""Benchmark of the service: classify throughput and latency through HTTP, Redis and a worker,
next to the model's own in-process throughput measured in the same run.

Run: ``.venv/bin/python bench/bench_service.py [--checkpoint C] [--workers N] [--clients K]
[--duration S] [--url http://host:port]``.

1. In process (before the service starts, so nothing competes for the cores): decode the
   PNG and run the model on it, batch 1, in a loop with the same torch thread count a worker
   gets: images/s and latency. This is the work one classify job does.
2. The service: ``aex serve`` with an embedded Redis and N workers on a free loopback port
   (or ``--url`` of a running one), driven by K concurrent clients (threads with their own
   httpx connection), each posting the image to /v1/classify as fast as answers come, for
   ``--duration`` seconds after a warm-up: requests/s, p50/p95/p99 latency, errors.
3. Overhead ratio = (in-process images/s x workers) / service requests/s: how much of the
   workers' raw model capacity the queueing, HTTP and decoding cost (1.0 = none).

The checkpoint: ``--checkpoint``, else the first in models/checkpoints/, else a random
CIFAR-size ResNet-20 written to a temporary folder. Prints one JSON line with every number.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx
import numpy as np
import torch
from PIL import Image

from models.data.tensors import load_image_for_model
from models.nn.registry import CIFAR10_MEAN, CIFAR10_STD, create_model
from models.store.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from models.store.discovery import discover_checkpoints


def pick_checkpoint(given: str | None, scratch: Path) -> Path:
    if given:
        return Path(given)
    bundled = discover_checkpoints([REPO / "models" / "checkpoints"])
    if bundled:
        return next(iter(bundled.values()))
    args = dict(depth=20, width=16, num_classes=10, in_channels=3, input_size=32, activation="hhrelu")
    path = scratch / "random-resnet20.safetensors"
    save_checkpoint(
        path,
        create_model("preact_resnet", **args),
        CheckpointMeta(
            arch="preact_resnet",
            arch_args=args,
            classes=[f"class{i}" for i in range(10)],
            input_size=32,
            in_channels=3,
            mean=list(CIFAR10_MEAN),
            std=list(CIFAR10_STD),
        ),
    )
    return path


def test_png(size: int, channels: int, serial: int = 0) -> bytes:
    """A random image; ``serial`` is written into its first pixels, so every request can send
    a different upload (the service reuses the result of an identical one)."""
    rng = np.random.default_rng(0)
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    arr[0, :3, 0] = [(serial >> 16) & 255, (serial >> 8) & 255, serial & 255]
    img = Image.fromarray(arr if channels == 3 else arr[..., 0])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def in_process(checkpoint: Path, png: bytes, threads: int, duration: float) -> dict:
    """The model's own rate on the classify job's work: decode + forward, batch 1."""
    torch.set_num_threads(threads)
    model, meta = load_checkpoint(checkpoint)
    model.requires_grad_(False)

    def once() -> None:
        x = load_image_for_model(png, meta.input_size, meta.in_channels)
        with torch.no_grad():
            model(x[None]).softmax(1)

    for _ in range(20):
        once()
    times = []
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return {
        "images_per_s": len(times) / sum(times),
        "p50_ms": percentile(times, 50) * 1e3,
        "p95_ms": percentile(times, 95) * 1e3,
        "n": len(times),
        "threads": threads,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(
    checkpoint: Path, name: str, workers: int, threads: int, scratch: Path
) -> tuple[subprocess.Popen, str]:
    models = scratch / "models"
    models.mkdir()
    (models / f"{name}.safetensors").symlink_to(checkpoint.resolve())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEX_")}
    env.update(
        AEX_MODEL_DIRS=str(models),
        AEX_BUNDLED_MODELS="false",
        AEX_PORT=str(port),
        AEX_WORKERS=str(workers),
        AEX_TORCH_THREADS=str(threads),
        AEX_LOG_LEVEL="WARNING",
        AEX_MAX_QUEUE_DEPTH="10000",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "aex.cli", "serve"],
        cwd=REPO,
        env=env,
        stdout=open(scratch / "serve.log", "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("aex serve exited:\n" + (scratch / "serve.log").read_text())
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit("aex serve did not become ready:\n" + (scratch / "serve.log").read_text())


def drive(url: str, model: str, size: int, channels: int, clients: int, warmup: float, duration: float) -> dict:
    """K client threads posting /v1/classify back to back, each request a different image (so
    no answer comes from the service's result reuse); latencies after the warm-up."""
    start = time.monotonic()
    measure_from, stop_at = start + warmup, start + warmup + duration
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    serials = itertools.count(1)
    reused = [0]

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while (t0 := time.monotonic()) < stop_at:
                png = test_png(size, channels, next(serials))
                resp = http.post("/v1/classify", files={"image": ("x.png", png, "image/png")}, data={"model": model})
                t1 = time.monotonic()
                if t0 >= measure_from and t1 <= stop_at:
                    with lock:
                        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                        if resp.status_code == 200:
                            latencies.append(t1 - t0)
                            reused[0] += bool((resp.json().get("result") or {}).get("reused"))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "requests_per_s": len(latencies) / duration,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p95_ms": percentile(latencies, 95) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "ok": len(latencies),
        "statuses": statuses,
        "clients": clients,
        "reused": reused[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: first bundled, else a random ResNet-20)")
    ap.add_argument("--url", help="a running service to drive instead of starting one (its model: --model)")
    ap.add_argument("--model", help="model name at --url (default: the one started here)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured (each phase)")
    ap.add_argument("--warmup", type=float, default=2.0)
    args = ap.parse_args()
    if not 1 <= args.clients <= 256 or args.duration > 600:
        raise SystemExit("keep --clients in 1..256 and --duration under 600 s")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))

    scratch = Path(tempfile.mkdtemp(prefix="aex-bench-"))
    proc = None
    try:
        checkpoint = pick_checkpoint(args.checkpoint, scratch)
        meta = load_checkpoint(checkpoint)[1]
        png = test_png(meta.input_size, meta.in_channels)
        name = args.model or "bench"
        local = in_process(checkpoint, png, threads, args.duration)
        if args.url:
            url = args.url.rstrip("/")
        else:
            proc, url = start_service(checkpoint, name, args.workers, threads, scratch)
        served = drive(url, name, meta.input_size, meta.in_channels, args.clients, args.warmup, args.duration)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        shutil.rmtree(scratch, ignore_errors=True)

    capacity = local["images_per_s"] * args.workers
    ratio = capacity / served["requests_per_s"] if served["requests_per_s"] else float("inf")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    label = checkpoint.parent.name if checkpoint.stem == "model" else checkpoint.name
    print(
        f"checkpoint {label}: {meta.arch}, {meta.input_size}x{meta.input_size}x{meta.in_channels}, "
        f"{len(meta.classes)} classes; device {device}; {os.cpu_count()} cores"
    )
    print(f"{'':28s}{'per s':>10s}{'p50 ms':>10s}{'p95 ms':>10s}")
    print(
        f"{'in-process (1 proc, ' + str(threads) + ' thr)':28s}{local['images_per_s']:10.1f}"
        f"{local['p50_ms']:10.2f}{local['p95_ms']:10.2f}"
    )
    print(
        f"{'service (' + str(args.workers) + ' wkr, ' + str(args.clients) + ' clients)':28s}"
        f"{served['requests_per_s']:10.1f}{served['p50_ms']:10.2f}{served['p95_ms']:10.2f}"
    )
    print(
        f"overhead ratio (in-process x workers / service): {ratio:.2f}; statuses {served['statuses']}; "
        f"answers reused from an earlier identical upload: {served['reused']}"
    )
    print(
        json.dumps(
            {
                "checkpoint": label,
                "device": device,
                "workers": args.workers,
                "in_process": local,
                "service": served,
                "overhead_ratio": ratio,
            }
        )
    )


if __name__ == "__main__":
    main()
