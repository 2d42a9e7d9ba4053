"""Benchmark of the service: classify throughput and latency through HTTP, Redis and a worker,
next to the model's own in-process throughput measured in the same run.

Run: ``.venv/bin/python bench/bench_service.py [--checkpoint C] [--workers N]
[--clients 1,8,32] [--max-batch 1,16] [--duration S] [--url http://host:port --token T]``.

1. In process (before the service starts, so nothing competes for the cores): decode the
   PNG and run the model on it, batch 1, in a loop with the same torch thread count a worker
   gets: images/s and latency. This is the work one classify job does.
2. The service: ``aex serve`` with an embedded Redis and N workers on a free loopback port
   (or ``--url`` of a running one), once per ``--max-batch`` value (AEX_MAX_BATCH: 1 = no
   dynamic batching), driven by K concurrent clients for each ``--clients`` value (threads
   with their own httpx connection and the admin token `aex serve` wrote), each posting a
   different image to /v1/classify as fast as answers come, for ``--duration`` seconds after a
   warm-up: requests/s, p50/p95/p99 latency, statuses, the mean batch size the results name.
3. Ratio = service requests/s / (in-process images/s x workers): the share of the workers'
   batch-1 capacity the service delivers (1.0 = as fast as the model alone, one image at a
   time; above 1 when batching wins back more than queueing, HTTP and decoding cost).
4. Every answer is checked afterwards against the model run here on the client's own image
   (the input sha256 the result names, every probability within 1e-4): "answers N/N their
   own" means no client was handed a batch mate's result.

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
    """A random image of its own for each ``serial``: every request sends a different upload
    (the service reuses the result of an identical one), with a different answer, so a client
    handed a batch mate's answer would see it."""
    rng = np.random.default_rng(serial)
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr if channels == 3 else arr[..., 0])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


SERIALS = itertools.count(1)


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
    checkpoint: Path,
    name: str,
    workers: int,
    threads: int | None,
    scratch: Path,
    max_batch: int | None,
    loose_limits: bool = True,
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str, str]:
    """``aex serve`` on a free loopback port; returns (process, URL, the admin token it made).
    ``threads`` None: the workers' default torch threads; ``max_batch`` None: the default AEX_MAX_BATCH; ``loose_limits`` False: the default queue
    depth and jobs per principal (the clients then spread over several keys); ``extra_env``:
    more settings (AEX_...)."""
    models = scratch / "models"
    models.mkdir(exist_ok=True)
    link = models / f"{name}.safetensors"
    if not link.exists():
        link.symlink_to(checkpoint.resolve())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEX_")}
    env.update(
        AEX_MODEL_DIRS=str(models),
        AEX_BUNDLED_MODELS="false",
        AEX_PORT=str(port),
        AEX_WORKERS=str(workers),
        AEX_LOG_LEVEL="WARNING",
        AEX_TOKEN_FILE=str(scratch / f"token-{port}"),
        # The default's persistence (append-only, fsync always) in a folder of this run: a
        # folder kept from an earlier run would hold its keys, and no new token would be written.
        AEX_REDIS_DIR=str(scratch / f"redis-{port}"),
    )
    if threads is not None:
        env["AEX_TORCH_THREADS"] = str(threads)
    if loose_limits:
        env.update(AEX_MAX_QUEUE_DEPTH="10000", AEX_MAX_JOBS_PER_PRINCIPAL="100000")
    if max_batch is not None:
        env["AEX_MAX_BATCH"] = str(max_batch)
    env.update(extra_env or {})
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
                return proc, url, (scratch / f"token-{port}").read_text().strip()
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit("aex serve did not become ready:\n" + (scratch / "serve.log").read_text())


def drive(
    url: str, token: str, model: str, size: int, channels: int, clients: int, warmup: float, duration: float
) -> dict:
    """K client threads posting /v1/classify back to back, each request a different image (so
    no answer comes from the service's result reuse); latencies after the warm-up. Every
    answer is kept with its image, for ``verify``."""
    start = time.monotonic()
    measure_from, stop_at = start + warmup, start + warmup + duration
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    serials = SERIALS  # across every load of the run: no image is sent twice
    reused = [0]
    answers: list[tuple[int, dict]] = []
    batch_sizes: list[int] = []

    def client() -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
            while (t0 := time.monotonic()) < stop_at:
                serial = next(serials)
                png = test_png(size, channels, serial)
                resp = http.post("/v1/classify", files={"image": ("x.png", png, "image/png")}, data={"model": model})
                t1 = time.monotonic()
                result = (resp.json().get("result") or {}) if resp.status_code == 200 else {}
                with lock:
                    if result:
                        answers.append((serial, result))
                    if t0 >= measure_from and t1 <= stop_at:
                        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                        if resp.status_code == 200:
                            latencies.append(t1 - t0)
                            reused[0] += bool(result.get("reused"))
                            batch_sizes.append(int(result["provenance"]["method"].get("batch_size", 1)))

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
        "mean_batch_size": float(np.mean(batch_sizes)) if batch_sizes else float("nan"),
        "answers": answers,
    }


def verify(checkpoint: Path, answers: list[tuple[int, dict]], size: int, channels: int) -> dict:
    """Each client's answers against the model run here on the same image: the input's sha256
    the result names, and every probability (within 1e-4: a batch rounds like a batch of one
    to about 1e-6), so an answer handed to the wrong client (a batch mate's) is caught."""
    import hashlib

    model, meta = load_checkpoint(checkpoint)
    model.eval()
    wrong = 0
    for start in range(0, len(answers), 256):
        part = answers[start : start + 256]
        pngs = [test_png(size, channels, serial) for serial, _ in part]
        x = torch.stack([load_image_for_model(p, meta.input_size, meta.in_channels) for p in pngs])
        with torch.no_grad():
            probs = model(x).softmax(1)
        for (_, result), png, p in zip(part, pngs, probs):
            got = torch.tensor([result["probs"][c] for c in meta.classes])
            same_input = result["provenance"]["input_sha256"] == hashlib.sha256(png).hexdigest()
            wrong += not (same_input and torch.allclose(got, p, atol=1e-4))
    return {"checked": len(answers), "wrong": wrong}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: first bundled, else a random ResNet-20)")
    ap.add_argument("--url", help="a running service to drive instead of starting one (its model: --model)")
    ap.add_argument("--token", help="with --url: a token with the submit and read scopes")
    ap.add_argument("--model", help="model name at --url (default: the one started here)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--clients", default="1,8,32", help="comma list of concurrent client counts")
    ap.add_argument("--max-batch", default="1,16", help="comma list of AEX_MAX_BATCH values (one service each)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured (each phase)")
    ap.add_argument("--warmup", type=float, default=2.0)
    args = ap.parse_args()
    print(json.dumps(run(args)))


def run(args: argparse.Namespace) -> dict:
    """Every figure of the benchmark (``main``'s options; bench/bench_all.py calls it too)."""
    clients = [int(c) for c in str(args.clients).split(",")]
    batches = [int(b) for b in str(args.max_batch).split(",")] if not args.url else [0]
    if not all(1 <= c <= 256 for c in clients) or args.duration > 600:
        raise SystemExit("keep --clients in 1..256 and --duration under 600 s")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))

    scratch = Path(tempfile.mkdtemp(prefix="aex-bench-"))
    runs: list[dict] = []
    try:
        checkpoint = pick_checkpoint(args.checkpoint, scratch)
        meta = load_checkpoint(checkpoint)[1]
        png = test_png(meta.input_size, meta.in_channels)
        name = args.model or "bench"
        local = in_process(checkpoint, png, threads, args.duration)
        for max_batch in batches:
            proc = None
            try:
                if args.url:
                    url, token = args.url.rstrip("/"), args.token or ""
                else:
                    proc, url, token = start_service(checkpoint, name, args.workers, threads, scratch, max_batch)
                for k in clients:
                    served = drive(url, token, name, meta.input_size, meta.in_channels, k, args.warmup, args.duration)
                    served["verified"] = verify(checkpoint, served.pop("answers"), meta.input_size, meta.in_channels)
                    runs.append({"max_batch": max_batch or None, **served})
            finally:
                if proc is not None:
                    proc.send_signal(signal.SIGINT)
                    proc.wait(60)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    label = checkpoint.parent.name if checkpoint.stem == "model" else checkpoint.name
    print(
        f"checkpoint {label}: {meta.arch}, {meta.input_size}x{meta.input_size}x{meta.in_channels}, "
        f"{len(meta.classes)} classes; device {device}; {os.cpu_count()} cores; {args.workers} worker(s), "
        f"{threads} torch thread(s) each"
    )
    print(f"{'':34s}{'per s':>9s}{'p50 ms':>9s}{'p95 ms':>9s}{'x batch-1':>10s}{'batch':>7s}  answers")
    capacity = local["images_per_s"] * args.workers
    print(f"{'in process, batch 1':34s}{local['images_per_s']:9.1f}{local['p50_ms']:9.2f}{local['p95_ms']:9.2f}")
    for r in runs:
        r["ratio_to_in_process"] = r["requests_per_s"] / capacity if capacity else float("nan")
        label_run = f"service, max batch {r['max_batch'] or '?'}, {r['clients']} clients"
        v = r["verified"]
        reused = f"; {r['reused']} reused" if r["reused"] else ""
        print(
            f"{label_run:34s}{r['requests_per_s']:9.1f}{r['p50_ms']:9.2f}{r['p95_ms']:9.2f}"
            f"{r['ratio_to_in_process']:10.2f}{r['mean_batch_size']:7.1f}  {v['checked'] - v['wrong']}/{v['checked']}"
            f" their own{reused}"
            f"; statuses {r['statuses']}"
        )
    return {"checkpoint": label, "device": device, "workers": args.workers, "in_process": local, "service": runs}


if __name__ == "__main__":
    main()
