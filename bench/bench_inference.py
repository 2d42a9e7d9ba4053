"""Benchmark of a classify forward pass: CPU milliseconds per image of a bundled checkpoint,
as the model itself (NCHW), its channels-last frozen copy (``models.nn.layout``), the
fused inference copy (``models.nn.inference``) and that copy as the frozen graph classify runs
(``models.nn.graph``), at several batch sizes and torch thread counts.

Run: ``.venv/bin/python bench/bench_inference.py [--checkpoint cifar10-robust]
[--batches 1,4,16,32] [--threads 1,2] [--repeats 7] [--clock process|wall]``.

CPU time by default (``time.process_time``: every thread of the process), not wall time, so
that other processes on a shared machine move the figures less; with two threads on a busy
2-core machine it also counts the OpenMP threads' spinning while they wait for a core (figures
many times the one-thread ones), so ``--clock wall`` on a quiet machine says more there; the variants are measured in turn,
``--repeats`` times each, and the median of each is reported. Inputs are random images in
[0, 1]; the copies take theirs in NHWC, under ``torch.inference_mode()`` as the worker runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.nn.graph import graph_forward
from models.nn.inference import inference_copy
from models.nn.runtime import frozen_copy
from models.store.checkpoint import load_checkpoint


def ms_per_image(net, x: torch.Tensor, budget: float, clock=time.process_time) -> float:
    """ms per image of ``net(x)`` by ``clock`` over about ``budget`` seconds of it."""
    start = clock()
    calls = 0
    while clock() - start < budget:
        net(x)
        calls += 1
    return (clock() - start) / calls / x.shape[0] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="cifar10-robust", help="a folder of models/checkpoints")
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budget", type=float, default=0.25, help="seconds per measurement")
    ap.add_argument("--clock", choices=("process", "wall"), default="process")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    model, meta = load_checkpoint(REPO / "models" / "checkpoints" / args.checkpoint / "model.safetensors")
    variants = {
        "plain": (model, False),
        "nhwc": (frozen_copy(model).to(memory_format=torch.channels_last), True),
        "fused": (inference_copy(model), True),
    }
    example = torch.zeros(1, meta.in_channels, meta.input_size, meta.input_size)
    graph, why_not = graph_forward(inference_copy(model), example.contiguous(memory_format=torch.channels_last))
    if why_not is not None:
        sys.exit(f"the fused copy has no graph: {why_not}")
    variants["graph"] = (graph, True)
    print(f"{args.checkpoint}: {args.clock} ms/image, median of {args.repeats}")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in map(int, args.batches.split(",")):
            x = torch.rand(batch, meta.in_channels, meta.input_size, meta.input_size)
            xs = {True: x.contiguous(memory_format=torch.channels_last), False: x}
            times: dict[str, list[float]] = {name: [] for name in variants}
            with torch.inference_mode():
                for net, nhwc in variants.values():
                    for _ in range(3):
                        net(xs[nhwc])
                for _ in range(args.repeats):
                    for name, (net, nhwc) in variants.items():
                        times[name].append(ms_per_image(net, xs[nhwc], args.budget, clock))
            med = {name: statistics.median(t) for name, t in times.items()}
            row = "  ".join(f"{name} {ms:6.3f}" for name, ms in med.items())
            print(
                f"threads {threads} batch {batch:3d}: {row}  fused/plain {med['fused'] / med['plain']:.2f}"
                f"  graph/fused {med['graph'] / med['fused']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
