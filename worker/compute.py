"""What a classify job computes, apart from the queue, and the decoding every job shares: the
input as the model sees it (``load_input``, the API's checks again), the classification of
one image or of a worker's batch of them, with the stability score, and the result's cache
key. Explain jobs: ``worker.explaining``.

No job finishes with a number that is not finite: the network's input is checked where it is
made (``models.data.imaging.check_model_input``), its output before anything is computed from
it (``forward_checked``: an input whose logits are not all finite fails with
``non_finite_result`` and leaves the batch), and every number of the result by the typed
result itself (``jobs.results``)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from jobs.params import ClassifyParameters, JobParameters, result_cache_key
from jobs.results import ClassifyResult
from jobs.settings import Settings
from models.data.imaging import open_image, source_size
from models.data.tensors import image_to_tensor, load_dicom_for_model
from models.dicom.pixels import DicomImage
from models.dicom.reading import attribute, first_number
from models.errors import BadParameterError, NonFiniteResultError
from models.nn.runtime import eval_mode
from models.perturb.stability import stability_method, stability_reports
from models.version import __version__
from worker.provenance import build_provenance, sha256_hex
from worker.served import ServedModel

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


def cache_key(kind: str, served: ServedModel, digest: str, parameters: JobParameters) -> str:
    """The key a result is indexed (and reused) by: ``jobs.params.result_cache_key``."""
    return result_cache_key(kind, served.name, served.checkpoint_sha256, digest, parameters, __version__)


class JobInput(NamedTuple):
    """One job of a batch as the computation takes it."""

    data: bytes
    input_format: str
    parameters: Any  # ClassifyParameters or ExplainParameters


class DecodedInput(NamedTuple):
    """One input of a batch, decoded (``load_input``)."""

    index: int  # in the batch
    x: torch.Tensor  # C x H x W in [0, 1]
    dicom: DicomImage | None
    info: dict[str, Any]  # what the result says about the input
    digest: str  # the input's sha256
    timings: dict[str, float]  # "decode_seconds", then each later phase's


def classify_result(
    served: ServedModel,
    data: bytes,
    input_format: str,
    parameters: ClassifyParameters,
    progress: Progress | None = None,
    worker: str | None = None,
) -> ClassifyResult:
    """The result of a classify job: top classes, every probability, (with ``stability``) the
    stability score, and the provenance."""
    (out,) = classify_results(served, [JobInput(data, input_format, parameters)], progress=progress, worker=worker)
    if isinstance(out, BaseException):
        raise out
    return out


def decode_batch(served: ServedModel, inputs: list[JobInput]) -> tuple[list[Any], list[DecodedInput]]:
    """Each input of a batch decoded and checked on its own (``load_input``): (one slot per
    input, holding the error of an input that failed and None for the others, which the
    caller fills; the decoded inputs)."""
    out: list[Any] = []
    decoded: list[DecodedInput] = []
    for i, job in enumerate(map(JobInput._make, inputs)):
        t = time.perf_counter()
        try:
            x, dicom, info, digest = load_input(job.data, job.input_format, served, job.parameters.window)
        except Exception as exc:
            out.append(exc)
            continue
        out.append(None)
        decoded.append(DecodedInput(i, x, dicom, info, digest, {"decode_seconds": time.perf_counter() - t}))
    return out, decoded


def forward_checked(
    served: ServedModel, decoded: list[DecodedInput], out: list[Any]
) -> tuple[list[DecodedInput], torch.Tensor]:
    """One forward pass of a batch's decoded inputs: (those whose logits are all finite, their
    logits, float32 N x classes on the CPU). Each other input gets NonFiniteResultError in its
    slot of ``out``, and nothing more is computed from it (in eval mode the rows of a batch do
    not mix, so one input's NaN leaves the others' logits as they are)."""
    xs = torch.stack([d.x for d in decoded])
    # The logits feed only softmax and the result (no graph is ever built on them), so the
    # pass runs under inference_mode; on the CPU through the fused channels-last copy made at
    # load (ServedModel.classifier, models.nn.inference: BN folded, HHReLU in place; the same
    # logits to float rounding), as a frozen graph whose convolutions all run oneDNN's kernel, batch 1
    # included (models.nn.graph, models.nn.onednn: the copy's logits to float rounding).
    with torch.inference_mode():
        if served.device.type == "cpu":
            logits = served.classifier(xs.contiguous(memory_format=torch.channels_last)).float()
        else:
            with eval_mode(served.model):
                logits = served.model(xs.to(served.device)).float().cpu()
    finite = torch.isfinite(logits).all(1).tolist()
    for d, row, ok in zip(decoded, logits, finite):
        if not ok:
            bad = int((~torch.isfinite(row)).sum())
            out[d.index] = NonFiniteResultError(
                f"the model's output (logits) holds {bad} of {row.numel()} values that are NaN or infinite for "
                "this input, whose every value was finite and in [0, 1]: the checkpoint's computation overflows "
                "or is broken; no result is computed from it"
            )
    keep = [i for i, ok in enumerate(finite) if ok]
    return [decoded[i] for i in keep], logits[keep]


def classify_results(
    served: ServedModel,
    inputs: list[JobInput],
    progress: Progress | None = None,
    worker: str | None = None,
) -> list[ClassifyResult | BaseException]:
    """``classify_result`` of several jobs as one batch (a worker's dynamic batch): each input
    is decoded and checked on its own, and a bad one gets its own error in its place; the
    others run as one forward pass and, when they ask for it (every job of a batch asks the
    same: ``worker.batching.batch_signature``), one batch of stability searches.
    Probabilities equal a batch of one's to float rounding (about 1e-6). A job whose logits or
    result hold a number that is not finite gets NonFiniteResultError in its place."""
    start = time.perf_counter()
    inputs = [JobInput._make(i) for i in inputs]
    out, decoded = decode_batch(served, inputs)
    if not decoded:
        return out
    t = time.perf_counter()
    decoded, logits = forward_checked(served, decoded, out)
    if not decoded:
        return out
    xs = torch.stack([d.x for d in decoded])
    probs = logits.softmax(1)
    inference = time.perf_counter() - t
    first: ClassifyParameters = inputs[decoded[0].index].parameters
    stability: list[dict[str, Any] | None] = [None] * len(decoded)
    stability_seconds = 0.0
    if first.stability:
        t = time.perf_counter()
        phase = None if progress is None else (lambda done, total: progress(done, total, "stability"))
        stability = stability_reports(
            served.model,
            xs,
            served.meta.classes,
            served.meta.metrics,
            steps=first.stability_steps,
            mode=first.stability_mode.value,
            progress=phase,
        )
        stability_seconds = time.perf_counter() - t
    for d in decoded:
        d.timings["inference_seconds"] = inference
        if stability[0] is not None:
            d.timings["stability_seconds"] = stability_seconds
    seconds = round(time.perf_counter() - start, 6)
    for row, d in enumerate(decoded):
        try:
            out[d.index] = _classify_summary(
                served, probs[row], inputs[d.index].parameters, stability[row], d, seconds, len(decoded), worker
            )
        except NonFiniteResultError as exc:  # this job's own: the others of the batch stand
            out[d.index] = exc
    return out


def _classify_summary(
    served: ServedModel,
    probs: torch.Tensor,
    parameters: ClassifyParameters,
    stability: dict[str, Any] | None,
    decoded: DecodedInput,
    seconds: float,
    batch_size: int,
    worker: str | None,
) -> ClassifyResult:
    """One job's classify result from its probabilities (C) and stability report; seconds:
    the batch's whole time. Built as JSON values and validated once, as a whole (its finite
    check included: ``jobs.results.ResultModel``); each part built as a model of its own was
    checked and validated again, nine walks of the result per job. Those values are what rq
    stores (``ResultModel.from_json``): the result is not written out again."""
    classes, top_k = served.meta.classes, parameters.top_k
    values = probs.tolist()
    order = probs.argsort(descending=True).tolist()
    top = [
        {"class_index": i, "class_name": classes[i], "prob": values[i]}
        for i in order[: max(1, min(top_k, len(classes)))]
    ]
    # batch_size: the jobs that shared this one's forward pass (and searches).
    method: dict[str, Any] = {"top_k": top_k, "batch_size": batch_size}
    scored: dict[str, Any] = {}
    if stability is not None:
        scored["stability"] = stability
        method["stability"] = stability_method(parameters.stability_steps, parameters.stability_mode.value)
    provenance = build_provenance(
        served,
        kind="classify",
        parameters=parameters,
        method=method,
        input_sha256=decoded.digest,
        input_info=decoded.info,
        cache_key=cache_key("classify", served, decoded.digest, parameters),
        timings={**decoded.timings, "total_seconds": seconds},
        worker=worker,
    )
    return ClassifyResult.from_json(
        {
            "model": served.name,
            "predicted": top[0],
            "top": top,
            "probs": dict(zip(classes, values)),
            **scored,
            "reused": False,
            "provenance": provenance,
            "seconds": seconds,
        }
    )
