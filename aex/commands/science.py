"""The science-core commands that need no service: import the paper's networks, evaluate a
checkpoint (accuracy, ARA, AutoAttack, the randomisation sanity check of the maps)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aex.commands.common import friendly_errors, print_json
from models import defaults as D


@friendly_errors
def import_reference_cmd(
    source: Annotated[Path, typer.Argument(help="a reference resnet44-*.pt file (legacy torch.save)")],
    out: Annotated[Path, typer.Argument(help="where to write the .safetensors checkpoint")],
) -> None:
    """Convert one of the paper's released networks into an aex checkpoint, safely
    (restricted unpickler; no code in the file is run)."""
    from models.store.reference import import_reference

    meta = import_reference(source, out)
    print_json(
        {
            "checkpoint": str(out),
            "arch": meta.arch,
            "activation": meta.arch_args.get("activation"),
            "psi_state": meta.psi_state,
            "weights_sha256": meta.weights_sha256,
            "source_sha256": meta.extra.get("source_sha256"),
        }
    )


@friendly_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="an aex .safetensors checkpoint")],
    data: Annotated[str, typer.Option(help="data set: ImageFolder dir, tar, .npz or CIFAR-10 root")],
    n: Annotated[Optional[int], typer.Option(help="images in the seeded subset (default: all)")] = None,
    seed: Annotated[int, typer.Option(help="subset seed (randperm rule of the data README)")] = D.ARA_SEED,
    ara: Annotated[bool, typer.Option("--ara", help="also compute attack and BTR ARA (slow)")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="write the A(rho) curves to this PNG (needs --ara)")] = None,
    batch_size: Annotated[int, typer.Option(help="images per batch")] = 100,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: CUDA if present)")] = None,
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    progress: Annotated[bool, typer.Option(help="tqdm progress bars on stderr")] = True,
    record: Annotated[
        bool,
        typer.Option(
            "--record",
            help="store the figures in the checkpoint's metrics "
            "(weights unchanged): with --ara both ARAs and the per-image radii, "
            "else the accuracy of the whole split",
        ),
    ] = False,
    autoattack: Annotated[
        bool,
        typer.Option(
            "--autoattack",
            help="also AutoAttack robust accuracy in L2 (pyautoattack) on the subset; slow: give --n",
        ),
    ] = False,
    autoattack_attacks: Annotated[
        str,
        typer.Option(help="AutoAttack's 'standard' version, or attacks joined by commas (apgd-ce,apgd-t)"),
    ] = D.AUTOATTACK_ATTACKS,
    autoattack_eps: Annotated[
        Optional[float],
        typer.Option(help="L2 budget (default: RMS 0.5/sqrt(3072), i.e. 0.5 on CIFAR-10, 0.2526 on 28x28 grey)"),
    ] = None,
    sanity: Annotated[
        bool,
        typer.Option(
            "--sanity",
            help="also the cascading weight-randomisation check of Grad-CAM and the adversarial explanations",
        ),
    ] = False,
    sanity_n: Annotated[int, typer.Option(help="images of the sanity check: the first of the subset")] = D.SANITY_N,
    stability: Annotated[
        bool,
        typer.Option(
            "--stability",
            help="also the fast stability search's per-image radii on the subset, and their agreement with the "
            "exact radii recorded for it (--record stores them as the fast score's reference)",
        ),
    ] = False,
    faithfulness: Annotated[
        bool,
        typer.Option(
            "--faithfulness",
            help="also how often the Grad-CAM and explanation maps beat a random pixel order (deletion/insertion AUC)",
        ),
    ] = False,
) -> None:
    """Accuracy (and ARA, AutoAttack, the sanity check) of a checkpoint on a seeded subset; prints JSON."""
    from models.errors import BadParameterError
    from models.evaluation.evaluate import evaluate_checkpoint

    if plot is not None and not ara:
        raise BadParameterError("--plot draws the ARA curves; add --ara")
    print_json(
        evaluate_checkpoint(
            checkpoint,
            data,
            n=n,
            seed=seed,
            ara=ara,
            plot=plot,
            batch_size=batch_size,
            device=device,
            split=split,
            progress=progress,
            record=record,
            autoattack=autoattack,
            stability=stability,
            autoattack_attacks=autoattack_attacks,
            autoattack_eps=autoattack_eps,
            sanity=sanity,
            sanity_n=sanity_n,
            faithfulness=faithfulness,
        )
    )
