"""Training throughput: images per second of standard and robust steps, in the same run.

Usage: python bench/bench_train.py [--arch resnet20_cifar] [--batch 128] [--warmup 3]
       [--steps 10] [--threads N] [--device cpu|cuda] [--adv-train l2]

Both kinds of step run the trainer's own ``train_step`` on random CIFAR-sized batches: the
standard one (ReLU, cross-entropy) and the robust one (HHReLU, cross-entropy plus the
input-gradient penalty, i.e. double back-propagation). Prints images/s for each and the
ratio standard/robust, which is the price of the penalty.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from models.nn.registry import create_model
from models.train.config import TrainConfig
from models.train.distributed import DistInfo
from models.train.penalty import AdaptivePsi
from models.train.state import step_generator
from models.train.step import train_step


def time_steps(cfg: TrainConfig, batch: int, warmup: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    net = create_model(cfg.arch, activation="hhrelu" if cfg.robust else "relu", zero_init_residual=not cfg.robust).to(
        device
    )
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    psi = AdaptivePsi() if cfg.robust else None
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    info = DistInfo()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        train_step(net, net, opt, x.clone(), y, cfg, psi, 0.01, step_generator(0, "bench", i), info)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20_cifar")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--adv-train", default=None, choices=["l2", "l2min"])
    ap.add_argument(
        "--only",
        default=None,
        choices=["standard", "robust"],
        help="time one kind only (e.g. two processes side by side)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {}
    for name, robust in (("standard", False), ("robust", True)):
        if args.only and name != args.only:
            continue
        cfg = TrainConfig(data="", arch=args.arch, out="", robust=robust, adv_train=args.adv_train)
        results[name] = time_steps(cfg, args.batch, args.warmup, args.steps, device)
        print(f"{name:9s} {results[name]:8.1f} images/s", flush=True)
    ratio = results["standard"] / results["robust"] if len(results) == 2 else None
    if ratio is not None:
        print(f"ratio standard/robust {ratio:.2f}")
    print(
        json.dumps(
            {
                "arch": args.arch,
                "batch": args.batch,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "adv_train": args.adv_train,
                "images_per_s": results,
                "ratio": ratio,
            }
        )
    )


if __name__ == "__main__":
    main()
