"""Job functions, enqueued by dotted path ("worker.jobs.classify", "worker.jobs.explain").

Each takes small JSON-safe keyword arguments: the canonical parameters the API built with
``worker.protocol.classify_parameters`` / ``explain_parameters``. The upload is read from
Redis (the API stored it under ``upload_key(job_id)``, and said in ``job.meta["input_format"]``
whether it is DICOM) and deleted when the job ends. Results: the return value (JSON, kept by
rq for the result TTL) with a "provenance" block; for explanations also PNGs, and for a
DICOM input Secondary Capture objects, in Redis hashes with the same TTL. The job's cache
key (``job.meta["cache_key"]``) is what the worker process indexes the finished result by.
Models come from the process's ``ServedModels``, loaded once before the work loop.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from rq import get_current_job
from rq.job import Job

from aex import __version__
from aex.errors import BadParameterError, JobCancelledError
from models.ara import ARA_EPS, ARA_MOMENTUM, ARA_OVERSHOOT, ARA_STEPS
from models.explain import EXPLAIN_MOMENTUM, EXPLAIN_OVERSHOOT, explain_image
from models.imaging import open_image, prepare_array
from models.preprocess import array_to_tensor, load_dicom_for_model
from models.runtime import eval_mode
from models.stability import stability_score

from .protocol import (
    JobKind,
    cancel_key,
    classify_parameters,
    dicom_key,
    explain_parameters,
    images_key,
    result_cache_key,
    upload_key,
)
from .provenance import build_provenance, sha256_hex
from .served import ServedModel, served_models

log = logging.getLogger("aex.worker")

# Set by the worker when rq's stop-job command arrives for the job in hand (pubsub thread).
stop_requested = threading.Event()

PROGRESS_EVERY_SECONDS = 0.2


def _current_job() -> Job:
    job = get_current_job()
    if job is None:
        raise RuntimeError("worker.jobs functions run inside an rq job")
    return job


def _check_cancelled(job: Job) -> None:
    if stop_requested.is_set() or job.connection.exists(cancel_key(job.id)):
        raise JobCancelledError(f"job {job.id} was cancelled")


def _read_upload(job: Job) -> bytes:
    data = job.connection.get(upload_key(job.id))
    if data is None:
        raise BadParameterError("the uploaded image expired before a worker took the job (raise AEX_UPLOAD_TTL)")
    return data


class _Progress:
    """Writes job.meta["progress"] = {done, total, phase} at most every PROGRESS_EVERY_SECONDS
    (and at every phase change and at the end), and stops the job when it was cancelled."""

    def __init__(self, job: Job):
        self.job, self.last, self.last_phase = job, 0.0, None

    def report(self, done: int, total: int, phase: str) -> None:
        _check_cancelled(self.job)
        t = time.monotonic()
        if done >= total or phase != self.last_phase or t - self.last >= PROGRESS_EVERY_SECONDS:
            self.last, self.last_phase = t, phase
            self.job.meta["progress"] = {"done": int(done), "total": int(total), "phase": phase}
            self.job.save_meta()

    def phase(self, name: str, before: int = 0, after: int = 0) -> Callable[[int, int], None]:
        """progress(done, total) of one phase, after ``before`` steps of earlier phases and
        with ``after`` steps of later ones still to come."""
        return lambda done, total: self.report(before + done, before + total + after, name)


def stability_evaluations(steps: int) -> int:
    """Search evaluations of one stability score (two searches of steps + 1 evaluations)."""
    return 2 * (int(steps) + 1)


# --- input ---------------------------------------------------------------------------------
def _dicom_info(dicom) -> dict[str, Any]:
    """What the result says about a DICOM input: how its pixels were turned into the model's
    view. No patient or study identifiers (they stay in the DICOM outputs)."""
    ds = dicom.dataset
    sop = ds.get("SOPClassUID")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None

    def num(key):
        value = ds.get(key)
        return None if value is None or value == "" else float(value)

    return {
        "format": "dicom",
        "sop_class": sop.name if sop is not None else None,
        "modality": ds.get("Modality"),
        "photometric_interpretation": ds.get("PhotometricInterpretation"),
        "rows": ds.get("Rows"), "columns": ds.get("Columns"),
        "bits_stored": ds.get("BitsStored"), "samples_per_pixel": ds.get("SamplesPerPixel"),
        "transfer_syntax": ts.name if ts is not None else None,
        "rescale_slope": num("RescaleSlope"), "rescale_intercept": num("RescaleIntercept"),
        "window": list(dicom.window) if dicom.window is not None else None,
        "inverted": str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1",
    }


def _load_input(job: Job, served: ServedModel, window: list[float] | None):
    """(x float C x H x W in [0, 1], DicomImage or None, input description, input sha256)."""
    data = _read_upload(job)
    digest = sha256_hex(data)
    size, channels = served.meta.input_size, served.meta.in_channels
    if job.meta.get("input_format") == "dicom":
        x, dicom = load_dicom_for_model(data, size, channels, tuple(window) if window else None)
        return x, dicom, _dicom_info(dicom), digest
    if window:
        raise BadParameterError("window_center / window_width apply to DICOM input only")
    img = open_image(data)
    info = {"format": (img.format or "").lower(), "mode": img.mode, "width": img.width, "height": img.height}
    return array_to_tensor(prepare_array(img, size, channels)), None, info, digest


# --- stability -----------------------------------------------------------------------------
def stability_block(served: ServedModel, x: torch.Tensor, steps: int, progress) -> dict[str, Any]:
    """The stability score of ``x`` at its predicted class (models.stability), with the
    reference it is ranked against and a sentence a reviewer can read."""
    radii = served.meta.metrics.get("ara_radii")
    radii = radii if isinstance(radii, dict) else None
    reference = {k: list(radii.get(k) or []) for k in ("attack", "btr")} if radii else None
    score = stability_score(served.model, x, reference, steps=steps, progress=progress)
    score["predicted_name"] = served.meta.classes[score["predicted"]]
    if radii:
        ref_settings = radii.get("settings") or {}
        score["reference"] = {k: radii.get(k) for k in ("n", "seed", "data")} | {"settings": ref_settings}
        # Percentiles rank like against like only when both used the same search settings.
        score["comparable"] = all(
            ref_settings.get(k) == v for k, v in
            (("steps", steps), ("eps", ARA_EPS), ("overshoot", ARA_OVERSHOOT), ("momentum", ARA_MOMENTUM)))
        parts = [f"{score[f'{name}_percentile']:.0f}% ({label})" for name, label in
                 (("attack", "decision flip"), ("btr", "no better than chance"))
                 if score.get(f"{name}_percentile") is not None]
        score["summary"] = (f"this decision is more stable than {' and '.join(parts)} of the "
                            f"{score['reference_n']} evaluation images of the checkpoint") if parts else None
    else:
        score["reference"], score["comparable"] = None, False
        score["summary"] = "the checkpoint records no per-image ARA radii, so no percentiles"
    return score


def _stability_method(steps: int) -> dict[str, Any]:
    return {"searches": {"attack": "l2min", "btr": "btr"}, "steps": int(steps), "eps": ARA_EPS,
            "overshoot": ARA_OVERSHOOT, "momentum": ARA_MOMENTUM, "clamp": False}


def _cache_key(job: Job, kind: JobKind, served: ServedModel, digest: str, parameters: dict[str, Any]) -> str:
    key = result_cache_key(kind.value, served.name, served.checkpoint_sha256, digest, parameters, __version__)
    job.meta["cache_key"] = key  # the worker indexes the finished result under it
    return key


# --- jobs ----------------------------------------------------------------------------------
def classify(model: str, top_k: int = 5, stability: bool = False, stability_steps: int | None = None,
             window: list[float] | None = None) -> dict[str, Any]:
    """Class probabilities of the uploaded image under ``model`` (and, with ``stability``,
    its stability score)."""
    job = _current_job()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    stability_steps = int(stability_steps or ARA_STEPS)
    try:
        _check_cancelled(job)
        served = served_models().get(model)
        parameters = classify_parameters(top_k, stability, stability_steps, *(window or (None, None)))
        x, _dicom, info, digest = _load_input(job, served, window)
        timings["decode_seconds"] = time.perf_counter() - start
        t = time.perf_counter()
        with eval_mode(served.model), torch.no_grad():
            probs = served.model(x.unsqueeze(0).to(served.device)).softmax(1)[0].cpu()
        timings["inference_seconds"] = time.perf_counter() - t
        classes = served.meta.classes
        order = probs.argsort(descending=True).tolist()
        top = [{"class_index": i, "class_name": classes[i], "prob": float(probs[i])}
               for i in order[: max(1, min(top_k, len(classes)))]]
        result: dict[str, Any] = {
            "model": model,
            "predicted": top[0],
            "top": top,
            "probs": {c: float(p) for c, p in zip(classes, probs.tolist())},
        }
        method: dict[str, Any] = {"top_k": top_k}
        if stability:
            t = time.perf_counter()
            progress = _Progress(job)
            result["stability"] = stability_block(served, x, stability_steps, progress.phase("stability"))
            timings["stability_seconds"] = time.perf_counter() - t
            method["stability"] = _stability_method(stability_steps)
        key = _cache_key(job, JobKind.CLASSIFY, served, digest, parameters)
        timings["total_seconds"] = time.perf_counter() - start
        result["seconds"] = timings["total_seconds"]
        result["reused"] = False
        result["provenance"] = build_provenance(
            served, kind="classify", parameters=parameters, method=method, input_sha256=digest, input_info=info,
            cache_key=key, timings=timings, worker=job.worker_name)
        return result
    finally:
        job.connection.delete(upload_key(job.id))


def _png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _secondary_captures(dicom, served: ServedModel, summary: dict[str, Any], files: dict[str, bytes],
                        parameters: dict[str, Any]) -> dict[str, bytes]:
    """The Grad-CAM overlay, each explanation x + delta and its amplified difference as DICOM
    Secondary Capture objects in a new series of the source's study; names are added to
    ``summary`` ("dicom_files", each target's "dicom" and "dicom_difference")."""
    from models.dicom_output import secondary_captures

    images = [("gradcam_overlay", _png_array(files["gradcam_overlay.png"]))]
    for target in summary["targets"]:
        for key in ("image", "difference"):
            images.append((target[key][: -len(".png")], _png_array(files[target[key]])))
    gradcam = summary["gradcam"]
    targets = ", ".join(f"{t['role']} {t['class_name']}" for t in summary["targets"])
    derivation = (
        f"aex {__version__}, model {served.name} (checkpoint sha256 {served.checkpoint_sha256}). "
        f"Grad-CAM of class {summary['predicted']['class_name']} at layer {gradcam['layer']}, overlaid on the "
        f"input. Adversarial explanations (perturbation search in explain mode: rho {parameters['rho']}, "
        f"steps {parameters['steps']}, overshoot {EXPLAIN_OVERSHOOT}, momentum {EXPLAIN_MOMENTUM}, no clamping) "
        f"toward {targets}: x + delta and the amplified difference delta. Input resized to "
        f"{served.meta.input_size} x {served.meta.input_size}. Not for primary diagnosis."
    )
    objects = secondary_captures(dicom.dataset, images, derivation, series_description=f"aex {served.name}")
    out = {f"{name}.dcm": blob for name, blob in objects}
    summary["dicom_files"] = list(out)
    for target in summary["targets"]:
        target["dicom"] = target["image"][: -len(".png")] + ".dcm"
        target["dicom_difference"] = target["difference"][: -len(".png")] + ".dcm"
    return out


def explain(
    model: str,
    targets: list[str],
    rho: float,
    steps: int,
    layer: str | None = None,
    stability_steps: int | None = None,
    window: list[float] | None = None,
    result_ttl: int = 3600,
) -> dict[str, Any]:
    """Adversarial explanations for ``targets``, Grad-CAM of the predicted class and the
    stability score of the decision.

    The PNGs (input, gradcam, gradcam_overlay, one per target and its amplified difference)
    go to the hash ``images_key(job_id)``, the DICOM objects (DICOM input only) to
    ``dicom_key(job_id)``, both with ``result_ttl``; the summary is returned."""
    job = _current_job()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    stability_steps = int(stability_steps or ARA_STEPS)
    try:
        _check_cancelled(job)
        served = served_models().get(model)
        parameters = explain_parameters(targets, rho, steps, layer, stability_steps, *(window or (None, None)))
        x, dicom, info, digest = _load_input(job, served, window)
        timings["decode_seconds"] = time.perf_counter() - start

        # One progress bar over both phases: the explanation search, then the two stability searches.
        progress = _Progress(job)
        later = stability_evaluations(stability_steps)
        explain_total = [0]

        def search_progress(done: int, total: int) -> None:
            explain_total[0] = total
            progress.report(done, total + later, "search")

        t = time.perf_counter()
        summary, files = explain_image(
            served.model, served.meta.classes, x, targets, layer=layer, rho=rho, steps=steps,
            progress=search_progress, extra_summary={"model": model})
        timings["explain_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        summary["stability"] = stability_block(served, x, stability_steps,
                                               progress.phase("stability", before=explain_total[0]))
        timings["stability_seconds"] = time.perf_counter() - t
        _check_cancelled(job)

        dicom_files: dict[str, bytes] = {}
        if dicom is not None:
            t = time.perf_counter()
            try:
                dicom_files = _secondary_captures(dicom, served, summary, files, parameters)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                # A source without the identifiers a derived object must copy (study, SOP
                # instance, ...): the explanation stands; say why there are no DICOM objects.
                log.warning("job %s: no DICOM outputs: %s: %s", job.id, type(exc).__name__, exc)
                summary["dicom_error"] = f"no DICOM objects could be derived from this file: {type(exc).__name__}: {exc}"
            timings["dicom_seconds"] = time.perf_counter() - t
        with job.connection.pipeline() as pipe:
            pipe.hset(images_key(job.id), mapping=files)
            pipe.expire(images_key(job.id), result_ttl)
            if dicom_files:
                pipe.hset(dicom_key(job.id), mapping=dicom_files)
                pipe.expire(dicom_key(job.id), result_ttl)
            pipe.execute()
        key = _cache_key(job, JobKind.EXPLAIN, served, digest, parameters)
        timings["total_seconds"] = time.perf_counter() - start
        summary["seconds"] = timings["total_seconds"]
        summary["reused"] = False
        method = {
            "explain": {**summary["settings"], "mode": "explain"},
            "gradcam": summary["gradcam"],
            "stability": _stability_method(stability_steps),
        }
        summary["provenance"] = build_provenance(
            served, kind="explain", parameters=parameters, method=method, input_sha256=digest, input_info=info,
            cache_key=key, timings=timings, worker=job.worker_name)
        return summary
    finally:
        job.connection.delete(upload_key(job.id))
