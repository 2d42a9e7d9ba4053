"""What an explain job computes, apart from the queue: the explanation of one image or of a
worker's batch of them (``models.explain.pipeline``), its PNGs and DICOM objects (a
Parametric Map, Secondary Captures and the SR), both rendered from the pipeline's arrays, and
the typed result (``jobs.results.ExplainResult``) with its provenance. The rq job function
(``worker.tasks.explain``) and ``aex explain --checkpoint`` both call these, so the offline
command prints the result JSON a job returns.

Nothing that is not finite is explained, rendered or returned: an input whose logits are not
all finite leaves the batch before the searches (``worker.compute.forward_checked``), and each
explanation's arrays (the input, each x + delta, delta and probabilities, the Grad-CAM map) and
summary numbers are checked before a PNG or DICOM object is made from them
(``check_explained``); either fails that job alone with ``non_finite_result``."""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from jobs.finite import check_finite
from jobs.params import ExplainParameters
from jobs.results import ExplainResult
from models.defaults import EXPLAIN_MOMENTUM, EXPLAIN_OVERSHOOT
from models.dicom.pixels import DicomImage
from models.dicom.sanitize import UnusableSourceError
from models.errors import NonFiniteResultError
from models.explain.pipeline import ExplainedImage, explain_images
from models.perturb.stability import stability_method
from models.render.explanation import png_files
from models.version import __version__
from worker.compute import JobInput, Progress, cache_key, decode_batch, forward_checked
from worker.provenance import build_provenance
from worker.served import ServedModel

log = logging.getLogger("aex.worker")


class ExplainOutput(NamedTuple):
    """What an explain job computes: its result, its PNGs by name and its DICOM objects by name
    (empty unless the input is DICOM)."""

    result: ExplainResult
    files: dict[str, bytes]
    dicom_files: dict[str, bytes]


def _derivation(served: ServedModel, summary: dict[str, Any], parameters: ExplainParameters) -> str:
    """How the derived objects were made, in words (their Derivation Description)."""
    settings = summary.get("settings") or {}
    targets = ", ".join(f"{t['role']} {t['class_name']}" for t in summary["targets"])
    return (
        f"aex {__version__}, model {served.name} (checkpoint sha256 {served.checkpoint_sha256}). "
        f"Grad-CAM of class {summary['predicted']['class_name']} at layer {summary['gradcam']['layer']}, overlaid "
        f"on the input. Adversarial explanations (perturbation search in explain mode: rho {parameters.rho}, "
        f"steps {parameters.steps}, overshoot {settings.get('overshoot', EXPLAIN_OVERSHOOT)}, momentum "
        f"{settings.get('momentum', EXPLAIN_MOMENTUM)}, {'' if settings.get('clamp') else 'no '}clamping) toward "
        f"{targets}: x + delta and the amplified difference delta. Input resized to {served.meta.input_size} x "
        f"{served.meta.input_size}. Not for primary diagnosis."
    )


def secondary_capture_files(
    dicom: DicomImage,
    served: ServedModel,
    summary: dict[str, Any],
    pictures: dict[str, np.ndarray],
    parameters: ExplainParameters,
    gradcam: torch.Tensor,
) -> dict[str, bytes]:
    """The DICOM objects of an explanation, each in a new series of the source's study
    (``models.dicom.results``): the Grad-CAM map as a Parametric Map on the source's own pixel
    grid, the overlay, each explanation x + delta and its amplified difference as Secondary
    Captures (from ``pictures``, the arrays the PNGs are encoded from, enlarged and captioned:
    ``models.render.capture``), the report as an Encapsulated PDF and the Comprehensive
    3D SR that describes them; a malformed attribute of the source is left out or emptied in
    them, and named in ``summary["dicom_warnings"]``. Their names are added to
    ``summary`` ("dicom_files", each target's "dicom" and "dicom_difference") and their
    identifiers to ``summary["dicom_objects"]`` (name, role, SOP Class, SOP Instance and
    Series Instance UIDs; never a patient attribute)."""
    from models.data.geometry import map_to_source  # highdicom only when DICOM comes in
    from models.dicom.equipment import Provenance
    from models.dicom.results import explanation_objects
    from models.explain.region import salient_box
    from models.render.capture import capture_pictures

    # Enlarged by whole-pixel blocks to a readable size, captioned with the model's input size.
    images = capture_pictures(pictures, summary, served.meta.input_size)
    width, height = dicom.size
    kwargs = parameters.kwargs()
    on_source = map_to_source(gradcam.numpy(), width, height)
    derived = explanation_objects(
        dicom.dataset,
        on_source,
        images,
        summary,
        served.meta.metrics,
        kwargs,
        Provenance(served.name, served.checkpoint_sha256),
        _derivation(served, summary, parameters),
        class_codes=served.meta.class_codes,  # the SR codes findings in SNOMED CT etc. where it has one
        annotated=True,
        input_size=served.meta.input_size,  # the PDF report says what the model saw
        salient=salient_box(on_source),  # the SR's finding: the region OHIF draws with its words
    )
    out = {obj.name: obj.data for obj in derived.objects}
    summary["dicom_files"] = list(out)
    summary["dicom_objects"] = [obj.listing() for obj in derived.objects]
    if derived.warnings:  # the source's malformed attributes, by keyword (never a value)
        summary["dicom_warnings"] = derived.warnings
    for target in summary["targets"]:
        target["dicom"] = target["image"][: -len(".png")] + ".dcm"
        target["dicom_difference"] = target["difference"][: -len(".png")] + ".dcm"
    return out


def check_explained(image: ExplainedImage) -> None:
    """NonFiniteResultError naming the first array of an explanation (the input, a target's x +
    delta, delta or probabilities, the Grad-CAM map) or the summary number that is NaN or
    infinite: checked before anything is rendered, since a PNG or DICOM pixel would turn a NaN
    into a plausible 0 without a trace."""
    explanation = image.explanation
    arrays = [("the input", explanation.input), ("the probabilities", explanation.probs)]
    arrays.append(("the Grad-CAM map", image.gradcam))
    for i, t in enumerate(explanation.targets):
        arrays += [(f"target {i}'s x + delta", t.image), (f"target {i}'s delta", t.delta)]
        arrays += [(f"target {i}'s probabilities before", t.probs_before), (f"target {i}'s after", t.probs_after)]
    for what, array in arrays:
        bad = int((~torch.isfinite(array)).sum())
        if bad:
            raise NonFiniteResultError(
                f"{what} of the explanation holds {bad} of {array.numel()} values that are NaN or infinite; "
                "no picture or result is made from it"
            )
    check_finite(image.summary, "the explanation's summary")


def explain_result(
    served: ServedModel,
    data: bytes,
    input_format: str,
    parameters: ExplainParameters,
    progress: Progress | None = None,
    worker: str | None = None,
    **search,
) -> ExplainOutput:
    """The result of an explain job with its PNGs and DICOM objects (``ExplainOutput``).
    search: further ``Explainer`` settings the offline command may set (overshoot, clamp,
    bound_check), recorded in the result's "settings", or ``faithfulness_steps``."""
    (out,) = explain_results(served, [JobInput(data, input_format, parameters)], progress, worker, **search)
    if isinstance(out, BaseException):
        raise out
    return out


def explain_results(
    served: ServedModel,
    inputs: list[JobInput],
    progress: Progress | None = None,
    worker: str | None = None,
    **search,
) -> list[ExplainOutput | BaseException]:
    """``explain_result`` of several jobs as one batch (a worker's dynamic batch): each input
    is decoded and checked on its own, and a bad one gets its own error in its place; the
    others' explanation rows run as one search, their Grad-CAM as one pass and their stability
    searches as rows of one search. The jobs of a batch share every parameter but their
    targets and window (``worker.batching.batch_signature``). A job whose logits, arrays or
    result hold a number that is not finite gets NonFiniteResultError in its place."""
    start = time.perf_counter()
    inputs = [JobInput._make(i) for i in inputs]
    out, decoded = decode_batch(served, inputs)
    if not decoded:
        return out
    decoded, _ = forward_checked(served, decoded, out)
    if not decoded:
        return out
    first: ExplainParameters = inputs[decoded[0].index].parameters
    steps, mode = first.stability_steps, first.stability_mode.value
    explained = explain_images(
        served.model,
        served.meta.classes,
        torch.stack([d.x for d in decoded]),
        [inputs[d.index].parameters.targets for d in decoded],
        layer=first.layer,
        rho=first.rho,
        steps=first.steps,
        stability_steps=steps,
        stability_mode=mode,
        metrics=served.meta.metrics,
        progress=progress,
        timings=[d.timings for d in decoded],
        extra_summary={"model": served.name},
        **search,
    )
    for d, image in zip(decoded, explained):
        parameters, summary, timings = inputs[d.index].parameters, image.summary, d.timings
        try:
            check_explained(image)
        except NonFiniteResultError as exc:  # this job's own: the others of the batch stand
            out[d.index] = exc
            continue
        pictures = image.pictures()  # the PNGs and the DICOM objects, from the same arrays
        files = png_files(pictures)
        dicom_files = _dicom_outputs(d.dicom, served, summary, pictures, parameters, image.gradcam, timings)
        timings["total_seconds"] = time.perf_counter() - start
        method = {
            "explain": {**summary["settings"], "mode": "explain"},
            "gradcam": {k: v for k, v in summary["gradcam"].items() if k != "faithfulness"},
            "stability": stability_method(steps, mode),
            "faithfulness": summary.get("faithfulness"),  # issue 13: how each map's figures are defined
            "batch_size": len(decoded),  # the jobs that shared this one's searches
        }
        provenance = build_provenance(
            served,
            kind="explain",
            parameters=parameters,
            method=method,
            input_sha256=d.digest,
            input_info=d.info,
            cache_key=cache_key("explain", served, d.digest, parameters),
            timings=timings,
            worker=worker,
        )
        result = {**summary, "seconds": timings["total_seconds"], "reused": False, "provenance": provenance}
        try:
            out[d.index] = ExplainOutput(ExplainResult.model_validate(result), files, dicom_files)
        except NonFiniteResultError as exc:
            out[d.index] = exc
    return out


def _dicom_outputs(
    dicom: DicomImage | None,
    served: ServedModel,
    summary: dict[str, Any],
    pictures: dict[str, np.ndarray],
    parameters: ExplainParameters,
    gradcam: torch.Tensor,
    timings: dict[str, float],
) -> dict[str, bytes]:
    """The DICOM objects of a DICOM input's explanation (none for another input)."""
    if dicom is None:
        return {}
    t = time.perf_counter()
    dicom_files: dict[str, bytes] = {}
    try:
        dicom_files = secondary_capture_files(dicom, served, summary, pictures, parameters, gradcam)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # A source without the identifiers a derived object must copy (study, SOP
        # instance, ...): the explanation stands; say why there are no DICOM objects.
        # The exception's text may quote the source's attributes (patient data): never
        # log or return it, only its class.
        log.warning("no DICOM outputs: %s while deriving them from the source", type(exc).__name__)
        summary["dicom_error"] = (
            f"no DICOM objects could be derived from this file: {exc}"
            if isinstance(exc, UnusableSourceError)  # its message names the attribute, never a value
            else "no DICOM objects could be derived from this file: it lacks an identifier a derived object "
            f"must copy (study, series or SOP instance) ({type(exc).__name__})"
        )
    timings["dicom_seconds"] = time.perf_counter() - t
    return dicom_files
