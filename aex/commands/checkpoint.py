"""``aex checkpoint``: what a checkpoint says about itself, changed without retraining (the standard code of each class)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aex.commands.common import friendly_errors, print_json

checkpoint_app = typer.Typer(
    name="checkpoint",
    help="A checkpoint's metadata: the standard concept of each class (codes).",
    no_args_is_help=True,
)


@checkpoint_app.command("codes")
@friendly_errors
def codes(
    checkpoint: Annotated[Path, typer.Argument(help="an aex .safetensors checkpoint")],
    assignments: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="NAME=SCHEME:VALUE:MEANING for each class to code (SCT, DCM, LN or RADLEX), e.g. "
            "pneumonia=SCT:233604007:Pneumonia; NAME= removes a class's code; none: only show the codes"
        ),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="drop the codes of the classes not named instead of keeping them")
    ] = False,
) -> None:
    """Show or set the class -> code map a checkpoint stores (the SR codes a finding of a class
    with its code, in the private scheme 99AEX only when it has none). The checkpoint is
    rewritten atomically with its weights unchanged (their sha256 is checked); the file's own
    sha256, and so the UIDs of the DICOM objects made with it, change."""
    from models.dicom.class_codes import class_code_map
    from models.store.checkpoint import read_metadata, update_metadata

    meta = read_metadata(checkpoint)
    if assignments:
        mapping = class_code_map(assignments, meta.classes, None if replace else meta.class_codes)
        meta = update_metadata(checkpoint, class_codes=mapping)
    elif replace:
        meta = update_metadata(checkpoint, class_codes={})
    print_json({"checkpoint": str(checkpoint), "classes": meta.classes, "class_codes": meta.class_codes})
