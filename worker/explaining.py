"""What an explain job computes, apart from the queue: the explanation of one image or of a
worker's batch of them (``models.explain.pipeline``), its DICOM objects (a Parametric Map,
Secondary Captures and the SR) and the provenance block. The rq job function
(``worker.tasks.explain``) and ``aex explain --checkpoint`` both call these, so the offline
command prints the result JSON a job returns."""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.defaults import EXPLAIN_MOMENTUM, EXPLAIN_OVERSHOOT, STABILITY_MODE
from models.dicom.pixels import DicomImage
from models.explain.pipeline import explain_images
from models.perturb.stability import stability_method
from models.version import __version__
from worker.compute import Progress, cache_key, decode_batch
from worker.provenance import build_provenance
from worker.served import ServedModel

log = logging.getLogger("aex.worker")

ExplainOutput = tuple[dict[str, Any], dict[str, bytes], dict[str, bytes]]


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
) -> ExplainOutput:
    """The result of an explain job: (summary with provenance, PNGs by name, DICOM objects by
    name, empty unless the input is DICOM). parameters: ``jobs.params.explain_parameters``;
    search: further ``Explainer`` settings the offline command may set (overshoot, clamp,
    bound_check), recorded in the summary's "settings"."""
    (out,) = explain_results(served, [(data, input_format, parameters)], progress, worker, **search)
    if isinstance(out, BaseException):
        raise out
    return out


def explain_results(
    served: ServedModel,
    inputs: list[tuple[bytes, str, dict[str, Any]]],
    progress: Progress | None = None,
    worker: str | None = None,
    **search,
) -> list[ExplainOutput | BaseException]:
    """``explain_result`` of several jobs as one batch (a worker's dynamic batch): each input
    (data, input format, parameters) is decoded and checked on its own, and a bad one gets its
    own error in its place; the others' explanation rows run as one search, their Grad-CAM as
    one pass and their stability searches as rows of one search. The jobs of a batch share
    every parameter but their targets and window (``worker.batching.batch_signature``)."""
    start = time.perf_counter()
    out, decoded = decode_batch(served, inputs)
    if not decoded:
        return out  # type: ignore[return-value]
    p0 = inputs[decoded[0][0]][2]
    steps = int(p0["stability_steps"])
    mode = p0.get("stability_mode") or STABILITY_MODE
    maps: list[dict[str, torch.Tensor]] = [{} for _ in decoded]
    rendered = explain_images(
        served.model,
        served.meta.classes,
        torch.stack([d[1] for d in decoded]),
        [inputs[d[0]][2]["targets"] for d in decoded],
        layer=p0["layer"],
        rho=p0["rho"],
        steps=p0["steps"],
        stability_steps=steps,
        stability_mode=mode,
        metrics=served.meta.metrics,
        progress=progress,
        timings=[d[5] for d in decoded],
        extra_summary={"model": served.name},
        maps=maps,
        **search,
    )
    for (i, _x, dicom, info, digest, timings), (summary, files), cam in zip(decoded, rendered, maps):
        parameters = inputs[i][2]
        dicom_files = _dicom_outputs(dicom, served, summary, files, parameters, cam["gradcam"], timings)
        timings["total_seconds"] = time.perf_counter() - start
        summary["seconds"] = timings["total_seconds"]
        summary["reused"] = False
        method = {
            "explain": {**summary["settings"], "mode": "explain"},
            "gradcam": {k: v for k, v in summary["gradcam"].items() if k != "faithfulness"},
            "stability": stability_method(steps, mode),
            "faithfulness": summary.get("faithfulness"),  # issue 13: how each map's figures are defined
            "batch_size": len(decoded),  # the jobs that shared this one's searches
        }
        summary["provenance"] = build_provenance(
            served,
            kind="explain",
            parameters=parameters,
            method=method,
            input_sha256=digest,
            input_info=info,
            cache_key=cache_key("explain", served, digest, parameters),
            timings=timings,
            worker=worker,
        )
        out[i] = (summary, files, dicom_files)
    return out  # type: ignore[return-value]


def _dicom_outputs(
    dicom: DicomImage | None,
    served: ServedModel,
    summary: dict[str, Any],
    files: dict[str, bytes],
    parameters: dict[str, Any],
    gradcam: torch.Tensor,
    timings: dict[str, float],
) -> dict[str, bytes]:
    """The DICOM objects of a DICOM input's explanation (none for another input)."""
    if dicom is None:
        return {}
    t = time.perf_counter()
    dicom_files: dict[str, bytes] = {}
    try:
        dicom_files = secondary_capture_files(dicom, served, summary, files, parameters, gradcam)
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
    return dicom_files
