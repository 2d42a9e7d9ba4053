"""What a job computes, apart from the queue: the input decoded as the model sees it, the
classification, the whole explanation (``models.explain.pipeline``) with its DICOM objects,
and the provenance block. The rq job functions (``worker.jobs``) and ``aex explain
--checkpoint`` both call these, so the offline command prints the result JSON a job returns.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.data.imaging import open_image, source_size
from models.data.tensors import image_to_tensor, load_dicom_for_model
from models.defaults import EXPLAIN_MOMENTUM, EXPLAIN_OVERSHOOT, STABILITY_MODE
from models.dicom.pixels import DicomImage
from models.dicom.reading import attribute, first_number
from models.errors import BadParameterError
from models.explain.pipeline import explain_image
from models.nn.runtime import eval_mode
from models.perturb.stability import stability_method, stability_reports
from models.version import __version__
from worker.params import result_cache_key
from worker.provenance import build_provenance, sha256_hex
from worker.served import ServedModel
from worker.settings import Settings

log = logging.getLogger("aex.worker")

# progress(done, total, phase), called between search steps (it may raise to cancel).
Progress = Callable[[int, int, str], None]


def _dicom_info(dicom: DicomImage) -> dict[str, Any]:
    """What the result says about a DICOM input: how its pixels were turned into the model's
    view. No patient or study identifiers (they stay in the DICOM outputs)."""
    ds = dicom.dataset
    sop = ds.get("SOPClassUID")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None

    def num(key):
        return attribute(ds, key, first_number)

    return {
        "format": "dicom",
        "sop_class": sop.name if sop is not None else None,
        "modality": ds.get("Modality"),
        "photometric_interpretation": ds.get("PhotometricInterpretation"),
        "rows": ds.get("Rows"),
        "columns": ds.get("Columns"),
        "bits_stored": ds.get("BitsStored"),
        "samples_per_pixel": ds.get("SamplesPerPixel"),
        "transfer_syntax": ts.name if ts is not None else None,
        "rescale_slope": num("RescaleSlope"),
        "rescale_intercept": num("RescaleIntercept"),
        "window": list(dicom.window) if dicom.window is not None else None,
        "inverted": str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1",
    }


@functools.cache
def upload_limits() -> tuple[int, int]:
    """(AEX_MAX_IMAGE_PIXELS, AEX_MAX_ASPECT_RATIO) of this process: a worker gets the API's
    settings as its environment (``Settings.as_env``), so it checks with the API's limits."""
    settings = Settings()
    return settings.max_image_pixels, settings.max_aspect_ratio


def load_input(
    data: bytes,
    input_format: str,
    served: ServedModel,
    window: list[float] | None,
    limits: tuple[int, int] | None = None,
):
    """(x float C x H x W in [0, 1], DicomImage or None, input description, input sha256).

    The same decoding functions and checks as the API's admission (``service.uploads``), with
    ``limits`` = (max pixels, max aspect ratio), by default ``upload_limits()``; a JPEG is
    decoded at the reduced scale the model's input size allows, and only the region the model
    sees is converted to float (``models.data.imaging``)."""
    digest = sha256_hex(data)
    size, channels = served.meta.input_size, served.meta.in_channels
    max_pixels, max_aspect = limits or upload_limits()
    if input_format == "dicom":
        x, dicom = load_dicom_for_model(
            data, size, channels, tuple(window) if window else None, max_pixels=max_pixels, max_aspect=max_aspect
        )
        return x, dicom, _dicom_info(dicom), digest
    if window:
        raise BadParameterError("window_center / window_width apply to DICOM input only")
    img = open_image(data, max_pixels, max_aspect, draft=size)
    width, height = source_size(img)
    info = {"format": (img.format or "").lower(), "mode": img.mode, "width": width, "height": height}
    return image_to_tensor(img, size, channels), None, info, digest


def cache_key(kind: str, served: ServedModel, digest: str, parameters: dict[str, Any]) -> str:
    """The key a result is indexed (and reused) by: ``worker.params.result_cache_key``."""
    return result_cache_key(kind, served.name, served.checkpoint_sha256, digest, parameters, __version__)


def classify_result(
    served: ServedModel,
    data: bytes,
    input_format: str,
    parameters: dict[str, Any],
    progress: Progress | None = None,
    worker: str | None = None,
) -> dict[str, Any]:
    """The result of a classify job: top classes, every probability, (with ``stability``) the
    stability score, and the provenance. parameters: ``worker.params.classify_parameters``."""
    (out,) = classify_results(served, [(data, input_format, parameters)], progress=progress, worker=worker)
    if isinstance(out, BaseException):
        raise out
    return out


def classify_results(
    served: ServedModel,
    inputs: list[tuple[bytes, str, dict[str, Any]]],
    progress: Progress | None = None,
    worker: str | None = None,
) -> list[dict[str, Any] | BaseException]:
    """``classify_result`` of several jobs as one batch (a worker's dynamic batch): each input
    (data, input format, parameters) is decoded and checked on its own, and a bad one gets its
    own error in its place; the others run as one forward pass and, when they ask for it
    (every job of a batch asks the same: ``worker.batching.batch_signature``), one batch of
    stability searches. Probabilities equal a batch of one's to float rounding (about 1e-6)."""
    start = time.perf_counter()
    out: list[dict[str, Any] | BaseException] = []
    decoded: list[tuple[int, torch.Tensor, dict[str, Any], str, float]] = []
    for i, (data, input_format, parameters) in enumerate(inputs):
        t = time.perf_counter()
        try:
            x, _dicom, info, digest = load_input(data, input_format, served, parameters.get("window"))
        except Exception as exc:
            out.append(exc)
            continue
        out.append({})
        decoded.append((i, x, info, digest, time.perf_counter() - t))
    if not decoded:
        return out
    t = time.perf_counter()
    xs = torch.stack([d[1] for d in decoded])
    with eval_mode(served.model), torch.no_grad():
        probs = served.model(xs.to(served.device)).softmax(1).cpu()
    inference = time.perf_counter() - t
    parameters0 = inputs[decoded[0][0]][2]
    stability: list[dict[str, Any] | None] = [None] * len(decoded)
    stability_seconds = 0.0
    if parameters0.get("stability"):
        t = time.perf_counter()
        phase = None if progress is None else (lambda done, total: progress(done, total, "stability"))
        stability = stability_reports(
            served.model,
            xs,
            served.meta.classes,
            served.meta.metrics,
            steps=int(parameters0["stability_steps"]),
            mode=parameters0.get("stability_mode") or STABILITY_MODE,
            progress=phase,
        )
        stability_seconds = time.perf_counter() - t
    for row, (i, _x, info, digest, decode_seconds) in enumerate(decoded):
        timings = {"decode_seconds": decode_seconds, "inference_seconds": inference}
        if stability[row] is not None:
            timings["stability_seconds"] = stability_seconds
        out[i] = _classify_summary(
            served, probs[row], inputs[i][2], stability[row], info, digest, timings, len(decoded), worker
        )
    for result in out:
        if isinstance(result, dict):
            result["seconds"] = result["provenance"]["timings"]["total_seconds"] = round(time.perf_counter() - start, 6)
    return out


def _classify_summary(
    served: ServedModel,
    probs: torch.Tensor,
    parameters: dict[str, Any],
    stability: dict[str, Any] | None,
    info: dict[str, Any],
    digest: str,
    timings: dict[str, float],
    batch_size: int,
    worker: str | None,
) -> dict[str, Any]:
    """One job's classify result from its probabilities (C) and stability report."""
    classes, top_k = served.meta.classes, int(parameters["top_k"])
    order = probs.argsort(descending=True).tolist()
    top = [
        {"class_index": i, "class_name": classes[i], "prob": float(probs[i])}
        for i in order[: max(1, min(top_k, len(classes)))]
    ]
    result: dict[str, Any] = {
        "model": served.name,
        "predicted": top[0],
        "top": top,
        "probs": {c: float(p) for c, p in zip(classes, probs.tolist())},
    }
    # batch_size: the jobs that shared this one's forward pass (and searches).
    method: dict[str, Any] = {"top_k": top_k, "batch_size": batch_size}
    if stability is not None:
        result["stability"] = stability
        method["stability"] = stability_method(
            int(parameters["stability_steps"]), parameters.get("stability_mode") or STABILITY_MODE
        )
    result["reused"] = False
    result["provenance"] = build_provenance(
        served,
        kind="classify",
        parameters=parameters,
        method=method,
        input_sha256=digest,
        input_info=info,
        cache_key=cache_key("classify", served, digest, parameters),
        timings={**timings, "total_seconds": 0.0},
        worker=worker,
    )
    return result


def _png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _derivation(served: ServedModel, summary: dict[str, Any], parameters: dict[str, Any]) -> str:
    """How the derived objects were made, in words (their Derivation Description)."""
    settings = summary.get("settings") or {}
    targets = ", ".join(f"{t['role']} {t['class_name']}" for t in summary["targets"])
    return (
        f"aex {__version__}, model {served.name} (checkpoint sha256 {served.checkpoint_sha256}). "
        f"Grad-CAM of class {summary['predicted']['class_name']} at layer {summary['gradcam']['layer']}, overlaid "
        f"on the input. Adversarial explanations (perturbation search in explain mode: rho {parameters['rho']}, "
        f"steps {parameters['steps']}, overshoot {settings.get('overshoot', EXPLAIN_OVERSHOOT)}, momentum "
        f"{settings.get('momentum', EXPLAIN_MOMENTUM)}, {'' if settings.get('clamp') else 'no '}clamping) toward "
        f"{targets}: x + delta and the amplified difference delta. Input resized to {served.meta.input_size} x "
        f"{served.meta.input_size}. Not for primary diagnosis."
    )


def secondary_capture_files(
    dicom: DicomImage,
    served: ServedModel,
    summary: dict[str, Any],
    files: dict[str, bytes],
    parameters: dict[str, Any],
    gradcam: torch.Tensor,
) -> dict[str, bytes]:
    """The DICOM objects of an explanation, each in a new series of the source's study
    (``models.dicom.results``): the Grad-CAM map as a Parametric Map on the source's own pixel
    grid, the overlay, each explanation x + delta and its amplified difference as Secondary
    Captures, and the Comprehensive 3D SR that describes them. Their names are added to
    ``summary`` ("dicom_files", each target's "dicom" and "dicom_difference") and their
    identifiers to ``summary["dicom_objects"]`` (name, role, SOP Class, SOP Instance and
    Series Instance UIDs; never a patient attribute)."""
    from models.data.geometry import map_to_source  # highdicom only when DICOM comes in
    from models.dicom.equipment import Provenance
    from models.dicom.results import explanation_objects

    images = [("gradcam_overlay", "gradcam_overlay", _png_array(files["gradcam_overlay.png"]))]
    for target in summary["targets"]:
        for key, role in (("image", "explanation"), ("difference", "explanation_difference")):
            images.append((target[key][: -len(".png")], role, _png_array(files[target[key]])))
    width, height = dicom.size
    objects = explanation_objects(
        dicom.dataset,
        map_to_source(gradcam.numpy(), width, height),
        images,
        summary,
        served.meta.metrics,
        parameters,
        Provenance(served.name, served.checkpoint_sha256),
        _derivation(served, summary, parameters),
    )
    out = {obj.name: obj.data for obj in objects}
    summary["dicom_files"] = list(out)
    summary["dicom_objects"] = [obj.listing() for obj in objects]
    for target in summary["targets"]:
        target["dicom"] = target["image"][: -len(".png")] + ".dcm"
        target["dicom_difference"] = target["difference"][: -len(".png")] + ".dcm"
    return out


def explain_result(
    served: ServedModel,
    data: bytes,
    input_format: str,
    parameters: dict[str, Any],
    progress: Progress | None = None,
    worker: str | None = None,
    **search,
) -> tuple[dict[str, Any], dict[str, bytes], dict[str, bytes]]:
    """The result of an explain job: (summary with provenance, PNGs by name, DICOM objects by
    name, empty unless the input is DICOM). parameters: ``worker.params.explain_parameters``;
    search: further ``Explainer`` settings the offline command may set (overshoot, clamp,
    bound_check), recorded in the summary's "settings"."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    x, dicom, info, digest = load_input(data, input_format, served, parameters.get("window"))
    timings["decode_seconds"] = time.perf_counter() - start
    steps = int(parameters["stability_steps"])
    maps: dict[str, torch.Tensor] = {}
    summary, files = explain_image(
        served.model,
        served.meta.classes,
        x,
        parameters["targets"],
        layer=parameters["layer"],
        rho=parameters["rho"],
        steps=parameters["steps"],
        stability_steps=steps,
        stability_mode=parameters.get("stability_mode") or STABILITY_MODE,
        metrics=served.meta.metrics,
        progress=progress,
        timings=timings,
        extra_summary={"model": served.name},
        maps=maps,
        **search,
    )
    dicom_files: dict[str, bytes] = {}
    if dicom is not None:
        t = time.perf_counter()
        try:
            dicom_files = secondary_capture_files(dicom, served, summary, files, parameters, maps["gradcam"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # A source without the identifiers a derived object must copy (study, SOP
            # instance, ...): the explanation stands; say why there are no DICOM objects.
            # The exception's text may quote the source's attributes (patient data): never
            # log or return it, only its class.
            log.warning("no DICOM outputs: %s while deriving them from the source", type(exc).__name__)
            summary["dicom_error"] = (
                "no DICOM objects could be derived from this file: it lacks an identifier a derived object must "
                f"copy (study, series or SOP instance) or holds one that is not valid ({type(exc).__name__})"
            )
        timings["dicom_seconds"] = time.perf_counter() - t
    key = cache_key("explain", served, digest, parameters)
    timings["total_seconds"] = time.perf_counter() - start
    summary["seconds"] = timings["total_seconds"]
    summary["reused"] = False
    method = {
        "explain": {**summary["settings"], "mode": "explain"},
        "gradcam": {k: v for k, v in summary["gradcam"].items() if k != "faithfulness"},
        "stability": stability_method(steps, parameters.get("stability_mode") or STABILITY_MODE),
        "faithfulness": summary.get("faithfulness"),  # issue 13: how each map's figures are defined
    }
    summary["provenance"] = build_provenance(
        served,
        kind="explain",
        parameters=parameters,
        method=method,
        input_sha256=digest,
        input_info=info,
        cache_key=key,
        timings=timings,
        worker=worker,
    )
    return summary, files, dicom_files
