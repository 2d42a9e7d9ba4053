"""``aex train``: the offline trainer, with ``--resume`` taking the stored options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aex.commands.common import friendly_errors, print_json, typed, typed_command
from models import defaults as D


@friendly_errors
def train(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(
            help="checkpoint to write (.safetensors); resume state and the metrics "
            "log go beside it as <stem>.resume.safetensors and <stem>.metrics.jsonl"
        ),
    ],
    data: Annotated[
        Optional[str], typer.Option(help="training data: ImageFolder dir or tar, MedMNIST .npz, CIFAR-10 root")
    ] = None,
    arch: Annotated[Optional[str], typer.Option(help="resnet20_cifar, resnet44_cifar, preact_resnet, ...")] = None,
    val_data: Annotated[
        Optional[str],
        typer.Option(
            help="validation data (default: the data's val split, a sibling val file, or a seeded test subset)"
        ),
    ] = None,
    test_data: Annotated[
        Optional[str],
        typer.Option(
            help="test data (default: the data's test split or a sibling test file, e.g. train.tar -> test.tar)"
        ),
    ] = None,
    input_size: Annotated[Optional[int], typer.Option(help="resize images to this (28, 32, 64, 224)")] = None,
    in_channels: Annotated[Optional[int], typer.Option(help="1 (grey-scale) or 3 (RGB)")] = None,
    depth: Annotated[Optional[int], typer.Option(help="preact_resnet depth 6n+2")] = None,
    width: Annotated[Optional[int], typer.Option(help="preact_resnet first-stage width")] = None,
    augment: Annotated[Optional[str], typer.Option(help="cifar10, natural, medical or none (default: by data)")] = None,
    holdout: Annotated[float, typer.Option(help="fraction held out when the data has no val or test split")] = 0.1,
    class_weights: Annotated[
        Optional[str], typer.Option(help="'balanced': weight the cross-entropy by N / (C * n_c) (skewed data sets)")
    ] = None,
    robust: Annotated[bool, typer.Option("--robust", help="HHReLU + Lipschitz penalty with adaptive psi")] = False,
    psi0: Annotated[float, typer.Option(help="adaptive psi: psi0")] = D.PSI0,
    k_psi: Annotated[float, typer.Option(help="adaptive psi: k_psi")] = D.K_PSI,
    l_target: Annotated[
        Optional[float],
        typer.Option(help="adaptive psi: target cross-entropy (default 1.5 * ln(classes) / ln(10): 1.5 on CIFAR-10)"),
    ] = None,
    eps_better: Annotated[float, typer.Option(help="adaptive psi: largest step up")] = D.EPS_BETTER,
    eps_worse: Annotated[float, typer.Option(help="adaptive psi: largest step down")] = D.EPS_WORSE,
    zeta: Annotated[float, typer.Option(help="probability of the margin (tandem) scalar")] = D.ZETA,
    z: Annotated[float, typer.Option(help="exponent of |gradient| in the penalty")] = D.Z,
    hhrelu_delta: Annotated[float, typer.Option(help="HHReLU delta")] = D.HHRELU_DELTA,
    adv_train: Annotated[
        Optional[str],
        typer.Option(help="adversarial training: l2 (eps 0.01) or l2min (eps 0.1); half-and-half with --robust"),
    ] = None,
    adv_eps: Annotated[Optional[float], typer.Option(help="override the adversarial-training eps")] = None,
    adv_steps: Annotated[int, typer.Option(help="adversarial-training search steps")] = 7,
    epochs: Annotated[int, typer.Option(help="epochs (reference: 200)")] = 200,
    batch_size: Annotated[int, typer.Option(help="batch size per process")] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 0.1,
    schedule: Annotated[str, typer.Option(help="step (reference), cosine or onecycle")] = "step",
    milestones: Annotated[
        Optional[list[int]], typer.Option(help="step schedule: epochs where lr /= 10 (repeatable; default 85%, 97.5%)")
    ] = None,
    warmup_epochs: Annotated[float, typer.Option(help="cosine schedule: linear warm-up epochs")] = 0.0,
    momentum: Annotated[float, typer.Option(help="SGD momentum")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="weight decay (all parameters)")] = 1e-4,
    seed: Annotated[int, typer.Option(help="seed of initial weights, shuffling and augmentation")] = 0,
    val_n: Annotated[int, typer.Option(help="images of the per-epoch validation subset")] = 1000,
    ara_n: Annotated[int, typer.Option(help="images for the final attack and BTR ARA (0: skip)")] = 100,
    ara_seed: Annotated[int, typer.Option(help="seed of the ARA subset")] = D.ARA_SEED,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda ... (default: CUDA if present)")] = None,
    workers: Annotated[int, typer.Option(help="batch-preparation worker processes (0: in the main process)")] = 0,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads")] = None,
    stop_after: Annotated[
        Optional[int], typer.Option(help="train this many epochs now, then stop (--resume later)")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run at --out where it stopped")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start over even if --out exists")] = False,
    download: Annotated[bool, typer.Option("--download", help="download torchvision CIFAR-10 into --data")] = False,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="torch deterministic algorithms")] = False,
    progress: Annotated[bool, typer.Option(help="progress bar on stderr")] = True,
    class_code: Annotated[
        Optional[list[str]],
        typer.Option(
            help="the standard concept of a class, NAME=SCHEME:VALUE:MEANING (repeatable; SCT, DCM, LN or "
            "RADLEX), e.g. pneumonia=SCT:233604007:Pneumonia; the SR codes that class's findings with it"
        ),
    ] = None,
) -> None:
    """Train a classifier (standard, --robust, --adv-train); checkpoints every epoch; under
    torchrun it trains with DistributedDataParallel. Ends with test accuracy and ARA."""
    import os

    # On CPUs shared with other jobs, spinning OpenMP threads collapse throughput (measured
    # 12x slower); passive waiting costs nothing measurable on an idle machine. Only takes
    # effect if torch is not imported yet (the usual case for the command line).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from models.errors import BadParameterError
    from models.train.config import TrainConfig
    from models.train.loop import train as run_training
    from models.train.run import stored_config

    given = dict(ctx.params)
    given["out"] = str(out)
    given["command"] = typed_command(ctx)
    if resume and (data is None or arch is None) and (old := stored_config(out)) is not None:
        # `aex train --out C --resume`: the stored options, with the ones typed now on top.
        base = {**old.recipe(), "resume": True, "out": str(out), "command": given["command"]}
        for name, value in given.items():
            if typed(ctx, name):
                base[name] = value
        given = base
    if given.get("data") is None or given.get("arch") is None:
        raise BadParameterError("--data and --arch are required (unless --resume finds a run at --out)")
    run = run_training(TrainConfig(**given))
    if run.info.is_main and run.final:
        print_json({"checkpoint": str(out), **run.final})
