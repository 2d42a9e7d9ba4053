"""The service commands: ``aex serve`` (the whole stack), ``aex worker`` and ``aex classify``
through a running service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aex.commands.common import JobProgress, UrlOpt, friendly_errors, print_json


@friendly_errors
def classify(
    image: Annotated[Path, typer.Argument(help="an image file (PNG, JPEG, TIFF, BMP, WebP) or DICOM .dcm")],
    url: UrlOpt = None,
    model: Annotated[Optional[str], typer.Option(help="served model name (default: the service's)")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="how many of the most probable classes to list")] = None,
    stability: Annotated[bool, typer.Option("--stability", help="also the stability score (slower)")] = False,
    progress: Annotated[bool, typer.Option(help="progress bar on stderr while the job runs")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each HTTP request")] = 60.0,
    token: Annotated[
        Optional[str], typer.Option(help="access token (default: AEX_TOKEN, else the token file)", show_default=False)
    ] = None,
) -> None:
    """Classify one image through the aex service; prints the result as JSON."""
    from aex.client import AexClient

    bar = JobProgress(progress, "classify")
    try:
        with AexClient(url, timeout=timeout, token=token) as client:
            job = client.classify(image, model=model, top_k=top_k, stability=stability, on_progress=bar)
    finally:
        bar.close()
    print_json({"job": job["id"], **job["result"]})


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
    ephemeral: Annotated[
        bool,
        typer.Option(
            "--ephemeral",
            help="embedded Redis: keep nothing on disk (AEX_REDIS_EPHEMERAL=true); jobs, results and API keys "
            "are lost when it restarts or aex serve stops. Default: kept in AEX_REDIS_DIR, else "
            "~/.local/state/aex/redis",
        ),
    ] = False,
) -> None:
    """Run the web service: the API, N workers and (unless AEX_REDIS_URL is set) an embedded
    Redis that keeps its data in a per-user folder (unless --ephemeral), with the bundled
    checkpoints and AEX_MODEL_DIRS. Ctrl-C stops everything cleanly."""
    from aex.serve import serve as serve_stack
    from jobs.settings import Settings

    overrides = {"host": host, "port": port, "workers": workers, "redis_url": redis_url}
    if ephemeral:  # absent, AEX_REDIS_EPHEMERAL decides
        overrides["redis_ephemeral"] = True
    serve_stack(Settings(**{k: v for k, v in overrides.items() if v is not None}))


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
    from jobs.settings import Settings

    settings = Settings(**({"redis_url": redis_url} if redis_url else {}))
    from worker.run import cuda_devices, run_worker

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
