"""Benchmark: what the faithfulness figures (issue 13) add to an explain job's CPU time.

Run: ``.venv/bin/python bench/bench_faithfulness.py [--n 10] [--threads 1] [--checkpoint PATH]``.

The same explain jobs as the service runs them (``worker.explaining.explain_result`` with the
request defaults: targets predicted + runner-up, rho 0.1, 35 steps, the stability score at
AEX_STABILITY_STEPS' default), on the first n images of the seeded CIFAR-10 test subset (seed
1776), each run twice in one process: with the deletion and insertion curves of every map
(Grad-CAM and the two explanations' |delta|) and without them (``faithfulness_steps=0``),
alternating which goes first. Reported: the CPU time (``time.process_time``, all threads of
this process) and wall time of each, their ratio, and the faithfulness step's own seconds as
the job's timings state them. Issue 13 allows at most 1.20.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.params import ExplainParameters
from models.data.datasets import load_dataset
from models.data.splits import seeded_subset
from models.defaults import ARA_SEED, ARA_STEPS, EXPLAIN_RHO, EXPLAIN_STEPS, REQUEST_TARGETS
from models.render.png import to_png_bytes, to_uint8_image
from worker.explaining import explain_result
from worker.served import ServedModel

DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "test.tar"
CHECKPOINT = REPO / "models" / "checkpoints" / "cifar10-robust" / "model.safetensors"


def run_once(
    served: ServedModel, data: bytes, parameters: ExplainParameters, faithfulness: bool
) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, the job's faithfulness_seconds) of one explain job."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = explain_result(served, data, "png", parameters, **({} if faithfulness else {"faithfulness_steps": 0}))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert (result.result.gradcam.faithfulness is not None) == faithfulness
    return cpu, wall, result.result.provenance.timings.get("faithfulness_seconds", 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="images (jobs of each kind)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--stability-steps", type=int, default=ARA_STEPS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    served = ServedModel.load("bench", args.checkpoint, torch.device("cpu"))
    ds = load_dataset(args.data, split="test", input_size=served.meta.input_size, in_channels=served.meta.in_channels)
    idx = seeded_subset(len(ds), args.n, ARA_SEED)
    images = [to_png_bytes(to_uint8_image(ds.images[i].float() / 255.0)) for i in idx.tolist()]
    parameters = ExplainParameters.build(
        targets=list(REQUEST_TARGETS),
        rho=EXPLAIN_RHO,
        steps=EXPLAIN_STEPS,
        layer=served.gradcam_layer,
        stability_steps=args.stability_steps,
    )
    run_once(served, images[0], parameters, True)  # warm-up: first-call costs out of the figures
    on, off, own = [], [], []
    for i, data in enumerate(images):
        order = (True, False) if i % 2 == 0 else (False, True)
        for with_it in order:
            cpu, wall, seconds = run_once(served, data, parameters, with_it)
            (on if with_it else off).append((cpu, wall))
            if with_it:
                own.append(seconds)
    cpu_on, cpu_off = sum(c for c, _ in on), sum(c for c, _ in off)
    wall_on, wall_off = sum(w for _, w in on), sum(w for _, w in off)
    print(
        json.dumps(
            {
                "checkpoint": str(
                    args.checkpoint.relative_to(REPO) if args.checkpoint.is_relative_to(REPO) else args.checkpoint
                ),
                "n": args.n,
                "threads": args.threads,
                "parameters": parameters.kwargs(),
                "cpu_seconds_per_job_with": cpu_on / args.n,
                "cpu_seconds_per_job_without": cpu_off / args.n,
                "cpu_ratio": cpu_on / cpu_off,
                "wall_ratio": wall_on / wall_off,
                "per_image_cpu_ratio_median": statistics.median(a[0] / b[0] for a, b in zip(on, off)),
                "faithfulness_seconds_per_job": sum(own) / args.n,
                "faithfulness_share_of_job_wall": sum(own) / wall_on,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
