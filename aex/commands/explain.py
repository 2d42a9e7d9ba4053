"""``aex explain``: offline with a checkpoint (the worker's own computation, so the same result
JSON) or through a running service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from aex.commands.common import JobProgress, PhaseProgress, friendly_errors, print_json, typed
from models import defaults as D
from models.explain.targets import split_specs


@friendly_errors
def explain(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(help="an image file (PNG, JPEG, ...; through the service also DICOM .dcm)")],
    out: Annotated[Path, typer.Option(help="output folder")],
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(help="run offline with this aex .safetensors checkpoint (default: through the service)"),
    ] = None,
    url: Annotated[
        Optional[str],
        typer.Option(
            help="the aex service, without --checkpoint (default: AEX_URL, else the `aex serve` running as this "
            "user, from service.json beside the token file, else http://AEX_HOST:AEX_PORT)",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(help="through the service: served model name (default: the service's)")
    ] = None,
    targets: Annotated[
        Optional[list[str]],
        typer.Option(
            "--targets",
            "-t",
            help="predicted, runner-up, all, a class index or name; repeat or separate by commas "
            "(default offline: predicted, runner-up, all; through the service: the service's, predicted, runner-up)",
        ),
    ] = None,
    rho: Annotated[float, typer.Option(help="perturbation budget (RMS)")] = D.EXPLAIN_RHO,
    steps: Annotated[int, typer.Option(help="search steps S")] = D.EXPLAIN_STEPS,
    overshoot: Annotated[float, typer.Option(help="overshoot k (offline only)")] = D.EXPLAIN_OVERSHOOT,
    layer: Annotated[Optional[str], typer.Option(help="Grad-CAM layer, dotted name (default: model's)")] = None,
    stability_steps: Annotated[
        Optional[int],
        typer.Option(
            help=f"steps of each stability search (default: {D.ARA_STEPS} offline, the ARA setting; the "
            "service's AEX_STABILITY_STEPS through the service)"
        ),
    ] = None,
    stability_mode: Annotated[
        Optional[str],
        typer.Option(
            help="fast (an estimate of the 450-step searches' radii) or exact (the ARA's searches); default: "
            f"{D.STABILITY_MODE} offline, the service's AEX_STABILITY_MODE through the service"
        ),
    ] = None,
    clamp: Annotated[
        bool, typer.Option("--clamp", help="keep x + delta in [0, 1] during the search (offline only)")
    ] = False,
    bound_check: Annotated[
        bool, typer.Option(help="fail if rho is not reached in half the steps (offline only)")
    ] = True,
    device: Annotated[
        Optional[str], typer.Option(help="cpu, cuda ... (offline only; default: CUDA if present)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="progress bar on stderr")] = True,
    timeout: Annotated[float, typer.Option(help="through the service: seconds to wait for each HTTP request")] = 60.0,
) -> None:
    """Adversarial explanations and Grad-CAM for one image; writes PNGs and a summary.
    Offline (--checkpoint) and through the service (--url) alike: every PNG, the DICOM
    objects for DICOM input, and the result JSON (summary.json offline, result.json from the
    service); offline, the result is also printed."""
    from models.errors import BadParameterError

    if checkpoint is not None and url is not None:
        raise BadParameterError("give one of --checkpoint (run offline) and --url (use the service), not both")
    if checkpoint is None:
        offline_only = [
            f"--{n.replace('_', '-')}" for n in ("overshoot", "clamp", "bound_check", "device") if typed(ctx, n)
        ]
        if offline_only:
            raise BadParameterError(
                f"offline-only options given without --checkpoint: {', '.join(offline_only)} (they need --checkpoint)"
            )
        _explain_via_service(
            image,
            out,
            url,
            model=model,
            targets=targets,
            rho=rho,
            steps=steps,
            layer=layer,
            stability_steps=stability_steps,
            stability_mode=stability_mode,
            progress=progress,
            timeout=timeout,
        )
        return
    if model is not None:
        raise BadParameterError("--model names a served model; offline, give the file with --checkpoint")
    from jobs.params import ExplainParameters
    from models.defaults import DEFAULT_TARGETS
    from models.dicom.pixels import is_dicom
    from models.nn.runtime import pick_device
    from models.render.explanation import write_files
    from models.store.discovery import served_name
    from worker.explaining import explain_result
    from worker.served import ServedModel

    served = ServedModel.load(served_name(checkpoint), checkpoint, pick_device(device))
    data = image.read_bytes()
    # "-t predicted -t cat" and "-t predicted,cat" both work; the default layer by name, as
    # the service names it, so the parameters (and the result's cache key) are the service's;
    # an option left out takes the parameters' own default.
    parameters = ExplainParameters.build(
        targets=split_specs(targets) or list(DEFAULT_TARGETS),
        rho=rho,
        steps=steps,
        layer=layer or served.gradcam_layer,
        stability_steps=stability_steps,
        stability_mode=stability_mode,
    )
    bar = PhaseProgress(progress, "explain")
    try:
        # The same function computes the service's explain jobs, so this prints their result JSON.
        output = explain_result(
            served,
            data,
            "dicom" if is_dicom(data) else "image",
            parameters,
            progress=bar,
            overshoot=overshoot,
            clamp=clamp,
            bound_check=bound_check,
        )
    finally:
        bar.close()
    result = output.result.dump()  # the JSON an explain job returns
    write_files(out, result, {**output.files, **output.dicom_files})
    print_json(result)


def _explain_via_service(
    image: Path,
    out: Path,
    url: str | None,
    *,
    model,
    targets,
    rho,
    steps,
    layer,
    stability_steps,
    stability_mode,
    progress,
    timeout,
) -> None:
    from aex.client import AexClient

    bar = JobProgress(progress, "explain")
    try:
        with AexClient(url, timeout=timeout) as client:
            job = client.explain(
                image,
                model=model,
                targets=split_specs(targets) or None,
                rho=rho,
                steps=steps,
                layer=layer,
                stability_steps=stability_steps,
                stability_mode=stability_mode,
                on_progress=bar,
            )
            saved = client.download_images(job, out) + client.download_dicom(job, out)
    finally:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(job, indent=2) + "\n")
    result = job["result"]
    summary = {
        "out": str(out),
        "job": job["id"],
        "model": job.get("model"),
        "predicted": result["predicted"],
        "targets": [
            {k: t.get(k) for k in ("role", "class_name", "rms", "prob_before", "prob_after")}
            for t in result.get("targets", [])
        ],
    }
    if result.get("stability") is not None:
        summary["stability"] = result["stability"]
    summary["files"] = sorted(p.name for p in saved) + ["result.json"]
    print_json(summary)
