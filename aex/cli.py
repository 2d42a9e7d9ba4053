"""The ``aex`` command line: one typer app, one function per command.

Commands stay thin: they parse options, call into ``models/`` (or ``worker/``,
``service/``) and print results. Heavy imports (torch) happen inside the commands so
``aex --help`` stays fast. To add a command, write one ``@app.command()`` function.
Errors from ``aex.errors`` become a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from models import defaults as D
from models.errors import AexError
from models.explain.targets import split_specs

app = typer.Typer(
    name="aex",
    help="Adversarial explanations, Grad-CAM and robustness (ARA) for image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def friendly_errors(fn):
    """Report project errors as ``error [code]: message`` instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AexError as exc:
            typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False))


@app.command("import-reference")
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


@app.command()
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
) -> None:
    """Accuracy (and ARA) of a checkpoint on a seeded subset; prints JSON."""
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
        )
    )


@app.command()
@friendly_errors
def explain(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(help="an image file (PNG, JPEG, ...; with --url also DICOM .dcm)")],
    out: Annotated[Path, typer.Option(help="output folder")],
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="run offline with this aex .safetensors checkpoint (or use --url)")
    ] = None,
    url: Annotated[
        Optional[str],
        typer.Option(help="use the aex service at this address, e.g. http://127.0.0.1:8000 (or use --checkpoint)"),
    ] = None,
    model: Annotated[Optional[str], typer.Option(help="with --url: served model name (default: the service's)")] = None,
    targets: Annotated[
        Optional[list[str]],
        typer.Option(
            "--targets",
            "-t",
            help="predicted, runner-up, all, a class index or name; repeat or separate by commas "
            "(default offline: predicted, runner-up, all; with --url: the service's, predicted, runner-up)",
        ),
    ] = None,
    rho: Annotated[float, typer.Option(help="perturbation budget (RMS)")] = D.EXPLAIN_RHO,
    steps: Annotated[int, typer.Option(help="search steps S")] = D.EXPLAIN_STEPS,
    overshoot: Annotated[float, typer.Option(help="overshoot k (offline only)")] = D.EXPLAIN_OVERSHOOT,
    layer: Annotated[Optional[str], typer.Option(help="Grad-CAM layer, dotted name (default: model's)")] = None,
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
    timeout: Annotated[float, typer.Option(help="with --url: seconds to wait for each HTTP request")] = 60.0,
) -> None:
    """Adversarial explanations and Grad-CAM for one image; writes PNGs and a summary.
    Offline (--checkpoint) and through the service (--url) alike: every PNG, the DICOM
    objects for DICOM input, and the result JSON (summary.json offline, result.json from the
    service); offline, the result is also printed."""
    from models.errors import BadParameterError

    if (checkpoint is None) == (url is None):
        raise BadParameterError("give exactly one of --checkpoint (run offline) and --url (use the service)")
    if url is not None:
        offline_only = [
            f"--{n.replace('_', '-')}" for n in ("overshoot", "clamp", "bound_check", "device") if _typed(ctx, n)
        ]
        if offline_only:
            raise BadParameterError(
                f"offline-only options given with --url: {', '.join(offline_only)} (they need --checkpoint)"
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
            progress=progress,
            timeout=timeout,
        )
        return
    if model is not None:
        raise BadParameterError("--model names a served model; offline, give the file with --checkpoint")
    from models.defaults import ARA_STEPS, DEFAULT_TARGETS
    from models.dicom.pixels import is_dicom
    from models.nn.runtime import pick_device
    from models.render.explanation import write_files
    from models.store.discovery import served_name
    from worker.compute import explain_result
    from worker.params import explain_parameters
    from worker.served import ServedModel

    served = ServedModel.load(served_name(checkpoint), checkpoint, pick_device(device))
    data = image.read_bytes()
    # "-t predicted -t cat" and "-t predicted,cat" both work; the default layer by name, as
    # the service names it, so the parameters (and the result's cache key) are the service's.
    parameters = explain_parameters(
        split_specs(targets) or list(DEFAULT_TARGETS), rho, steps, layer or served.gradcam_layer, ARA_STEPS
    )
    bar = _PhaseProgress(progress, "explain")
    try:
        # The same function computes the service's explain jobs, so this prints their result JSON.
        result, files, dicom_files = explain_result(
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
    write_files(out, result, {**files, **dicom_files})
    print_json(result)


class _PhaseProgress:
    """progress(done, total, phase) as a tqdm bar on stderr (offline explanations)."""

    def __init__(self, enabled: bool, what: str):
        from tqdm import tqdm

        self.what = what
        self.bar = tqdm(total=None, desc=what, unit="step", file=sys.stderr, disable=not enabled, leave=True)

    def __call__(self, done: int, total: int, phase: str) -> None:
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.set_description(f"{self.what}: {phase}", refresh=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _JobProgress:
    """on_progress for AexClient: a tqdm bar on stderr over the job's search steps (its
    queue position while it waits)."""

    def __init__(self, enabled: bool, what: str):
        self.what, self.enabled, self.bar = what, enabled, None

    def __call__(self, view: dict) -> None:
        if self.bar is None:  # created at the first answer: nothing is drawn when the upload fails
            from tqdm import tqdm

            self.bar = tqdm(
                total=None,
                desc=self.what,
                unit="step",
                file=sys.stderr,
                disable=not self.enabled,
                dynamic_ncols=True,
                leave=True,
            )
        status, prog = view.get("status"), view.get("progress") or {}
        if status == "queued":
            pos = view.get("queue_position")
            self.bar.set_description(f"{self.what}: queued" + (f" (position {pos})" if pos is not None else ""))
        elif prog.get("total"):
            if self.bar.total != prog["total"]:
                self.bar.reset(total=prog["total"])
            self.bar.set_description(f"{self.what}: {prog.get('phase') or status}")
            self.bar.n = prog["done"]
            self.bar.refresh()
        if status == "finished":
            if not self.bar.total:
                self.bar.reset(total=1)
            self.bar.n = self.bar.total
            self.bar.set_description(f"{self.what}: finished")
        elif status in ("failed", "cancelled"):
            self.bar.set_description(f"{self.what}: {status}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _explain_via_service(
    image: Path, out: Path, url: str, *, model, targets, rho, steps, layer, progress, timeout
) -> None:
    from aex.client import AexClient

    bar = _JobProgress(progress, "explain")
    try:
        with AexClient(url, timeout=timeout) as client:
            job = client.explain(
                image,
                model=model,
                targets=split_specs(targets) or None,
                rho=rho,
                steps=steps,
                layer=layer,
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


@app.command()
@friendly_errors
def classify(
    image: Annotated[Path, typer.Argument(help="an image file (PNG, JPEG, TIFF, BMP, WebP) or DICOM .dcm")],
    url: Annotated[str, typer.Option(help="the aex service, e.g. http://127.0.0.1:8000")],
    model: Annotated[Optional[str], typer.Option(help="served model name (default: the service's)")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="how many of the most probable classes to list")] = None,
    stability: Annotated[bool, typer.Option("--stability", help="also the stability score (slower)")] = False,
    progress: Annotated[bool, typer.Option(help="progress bar on stderr while the job runs")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each HTTP request")] = 60.0,
) -> None:
    """Classify one image through the aex service; prints the result as JSON."""
    from aex.client import AexClient

    bar = _JobProgress(progress, "classify")
    try:
        with AexClient(url, timeout=timeout) as client:
            job = client.classify(image, model=model, top_k=top_k, stability=stability, on_progress=bar)
    finally:
        bar.close()
    print_json({"job": job["id"], **job["result"]})


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was typed (typer vendors click, so compare by name)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _typed_command(ctx: typer.Context) -> str:
    """The options typed on the command line, as one shell line (``aex train ...``)."""
    import shlex

    parts = ["aex", ctx.info_name or "train"]
    for param in ctx.command.params:
        if not _typed(ctx, param.name):
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            parts.append(param.opts[0] if value else (param.secondary_opts or param.opts)[0])
        elif isinstance(value, (list, tuple)):
            for v in value:
                parts += [param.opts[0], str(v)]
        else:
            parts += [param.opts[0], str(value)]
    return shlex.join(parts)


@app.command()
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
    given["command"] = _typed_command(ctx)
    if resume and (data is None or arch is None) and (old := stored_config(out)) is not None:
        # `aex train --out C --resume`: the stored options, with the ones typed now on top.
        base = {**old.recipe(), "resume": True, "out": str(out), "command": given["command"]}
        for name, value in given.items():
            if _typed(ctx, name):
                base[name] = value
        given = base
    if given.get("data") is None or given.get("arch") is None:
        raise BadParameterError("--data and --arch are required (unless --resume finds a run at --out)")
    run = run_training(TrainConfig(**given))
    if run.info.is_main and run.final:
        print_json({"checkpoint": str(out), **run.final})


@app.command()
@friendly_errors
def serve(
    host: Annotated[Optional[str], typer.Option(help="listen address (AEX_HOST, default 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(help="listen port (AEX_PORT, default 8000)")] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(help="worker processes to start (AEX_WORKERS, default 1; 0: use workers started elsewhere)"),
    ] = None,
    redis_url: Annotated[
        Optional[str], typer.Option(help="Redis to use (AEX_REDIS_URL); unset: start an embedded one")
    ] = None,
) -> None:
    """Run the web service: the API, N workers and (unless AEX_REDIS_URL is set) an embedded
    Redis, with the bundled checkpoints and AEX_MODEL_DIRS. Ctrl-C stops everything cleanly."""
    from aex.serve import serve as serve_stack
    from worker.settings import Settings

    overrides = {"host": host, "port": port, "workers": workers, "redis_url": redis_url}
    serve_stack(Settings(**{k: v for k, v in overrides.items() if v is not None}))


@app.command("worker")
@friendly_errors
def worker_cmd(
    count: Annotated[
        Optional[int], typer.Option(help="worker processes (default: one per CUDA GPU, else AEX_WORKERS)")
    ] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="the service's Redis (AEX_REDIS_URL)")] = None,
    burst: Annotated[bool, typer.Option("--burst", help="one process: stop when the queues are empty")] = False,
) -> None:
    """Run workers against the service's Redis: each loads every served checkpoint once, then
    takes classify and explain jobs. SIGTERM/Ctrl-C: finish the current job, then exit."""
    from worker.settings import Settings

    settings = Settings(**({"redis_url": redis_url} if redis_url else {}))
    from worker.process import cuda_devices, run_worker

    gpus = cuda_devices()
    n = count or (len(gpus) if len(gpus) > 1 else max(1, settings.workers))
    if n == 1 or burst:
        run_worker(settings, burst=burst)
        return
    import signal
    import threading

    from worker.pool import WorkerPool

    pool = WorkerPool(settings, n, gpus=[gpus[i % len(gpus)] for i in range(n)] if gpus else None).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    pool.stop()


def main() -> None:  # pragma: no cover - entry point for `python -m aex.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
