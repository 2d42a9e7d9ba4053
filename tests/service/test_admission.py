"""Admission (service/admission.py): what is refused before a job is queued, each with its precise 4xx error: a queue no live worker serves (read from a real Redis) or at its depth, an upload or a PACS reference the workers would refuse, parameters over the limits, targets and layers the model does not have, a callback to a host not allowed; and what a job keeps (its input format, its reference, its callback URL sealed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.params import StabilityMode
from jobs.queues import JobKind
from jobs.rqueue import enqueue
from models.errors import (
    BadParameterError,
    QueueFullError,
    ServiceUnavailableError,
    UndecodableImageError,
    UnknownPacsError,
)
from service import admission
from service.catalogue import Catalogue
from service.multipart import Upload
from service.schemas import ClassifyParams, ExplainParams
from tests.support.dicom import write_dicom
from tests.support.images import encode_image
from tests.support.jobs import idle_worker

DB = 4
UID = "1.2.826.0.1.3680043.8.498.1"
PACS = {"orthanc": {"url": "http://127.0.0.1:8042/dicom-web", "username": "aex", "password": "pw"}}


@pytest.fixture
def settings(settings_for):
    return settings_for(DB, max_queue_depth=2, max_explain_steps=50, max_explain_rows=4, pacs=PACS)


@pytest.fixture
def entry(conn, settings, service_models):
    """tiny-rgb's catalogue entry (10 classes, 32 x 32 RGB, its layers) as a worker publishes it
    and the API reads it back."""
    import torch

    from worker.served import ServedModel

    served = ServedModel.load("tiny-rgb", service_models / "tiny-rgb" / "model.safetensors", torch.device("cpu"))
    worker = idle_worker(conn, name="publisher", catalogue=[served.catalogue_entry()])
    try:
        return Catalogue(settings).resolve(conn, "tiny-rgb")
    finally:
        worker.register_death()


def test_a_queue_needs_a_live_worker_and_room(conn, settings):
    with pytest.raises(ServiceUnavailableError, match="no worker is serving the classify queue"):
        admission.check_capacity(conn, JobKind.CLASSIFY, settings)
    worker = idle_worker(conn, queue_names=["aex-explain"])
    try:
        with pytest.raises(ServiceUnavailableError, match="classify queue"):
            admission.check_capacity(conn, JobKind.CLASSIFY, settings)  # a worker of the other queue only
        admission.check_capacity(conn, JobKind.EXPLAIN, settings)
        for n in range(2):
            enqueue(conn, JobKind.EXPLAIN, JobKind.EXPLAIN, f"{n:032x}", {}, {"kind": "explain"}, 60, 60, 60, "t")
        with pytest.raises(QueueFullError, match="the explain queue holds 2 jobs"):
            admission.check_capacity(conn, JobKind.EXPLAIN, settings)
    finally:
        worker.register_death()
    with pytest.raises(ServiceUnavailableError):
        admission.check_capacity(conn, JobKind.EXPLAIN, settings)  # its registration is gone


def test_an_upload_is_decoded_and_checked_as_the_model_will_take_it(settings, entry):
    image = Upload(encode_image("PNG", "RGB"), "a.png")
    assert admission.check_input(image, ClassifyParams(), settings, entry) == "image"
    yy, xx = np.mgrid[0:40, 0:48]
    dicom = Upload(write_dicom((xx * 40 + yy).astype(np.uint16), "MONOCHROME2"), "a.dcm")
    assert (
        admission.check_input(dicom, ClassifyParams(window_center=500, window_width=1000), settings, entry) == "dicom"
    )
    with pytest.raises(BadParameterError, match="DICOM input only"):
        admission.check_input(image, ClassifyParams(window_center=500, window_width=1000), settings, entry)
    with pytest.raises(UndecodableImageError):
        admission.check_input(Upload(encode_image("PNG", "RGB")[:60], "cut.png"), ClassifyParams(), settings, entry)


def test_a_pacs_reference_is_checked_without_the_network(settings, entry):
    ref = dict(pacs="orthanc", study_uid=UID + ".1", series_uid=UID + ".2", instance_uid=UID + ".3")
    assert admission.check_input(Upload(b"", None), ExplainParams(**ref), settings, entry) == "dicom"
    meta = admission.job_meta("dicom", ExplainParams(**ref), settings)
    assert meta["pacs_reference"] == {"pacs": "orthanc", **{k: v for k, v in ref.items() if k != "pacs"}}
    assert meta["store"] is True and "pw" not in json.dumps(meta) and "8042" not in json.dumps(meta)
    assert admission.job_meta("dicom", ExplainParams(**ref, store=False), settings)["store"] is False
    with pytest.raises(BadParameterError, match="not both"):
        admission.check_input(Upload(b"\x89PNG", "a.png"), ExplainParams(**ref), settings, entry)
    with pytest.raises(UnknownPacsError):
        admission.check_input(Upload(b"", None), ExplainParams(**{**ref, "pacs": "elsewhere"}), settings, entry)
    with pytest.raises(BadParameterError, match="instance_uid must be a DICOM UID"):
        admission.check_input(Upload(b"", None), ExplainParams(**{**ref, "instance_uid": "1.2.x"}), settings, entry)


def test_the_stability_search_takes_the_requests_steps_and_mode_within_the_limits(settings):
    assert admission.stability_steps(ClassifyParams(), settings) == settings.stability_steps
    assert admission.stability_steps(ClassifyParams(stability_steps=50), settings) == 50
    with pytest.raises(BadParameterError, match="stability_steps = 51 is over the limit of 50"):
        admission.stability_steps(ClassifyParams(stability_steps=51), settings)
    assert admission.stability_mode(ClassifyParams(), settings) is StabilityMode(settings.stability_mode)
    exact = settings.model_copy(update={"stability_mode": "exact"})
    assert admission.stability_mode(ClassifyParams(), exact) is StabilityMode.EXACT
    assert admission.stability_mode(ClassifyParams(stability_mode="fast"), exact) is StabilityMode.FAST


def test_explain_parameters_targets_and_layers_are_the_models(settings, entry):
    assert admission.check_explain(ExplainParams(steps=50), entry, settings) == entry["gradcam_layer"]
    layer = next(name for name in entry["layers"] if name != entry["gradcam_layer"])
    assert admission.check_explain(ExplainParams(layer=layer), entry, settings) == layer
    with pytest.raises(BadParameterError, match="steps = 51 is over the limit of 50"):
        admission.check_explain(ExplainParams(steps=51), entry, settings)
    with pytest.raises(BadParameterError, match="has no layer 'nowhere'"):
        admission.check_explain(ExplainParams(layer="nowhere"), entry, settings)
    with pytest.raises(BadParameterError):
        admission.check_explain(ExplainParams(targets=["giraffe"]), entry, settings)  # not one of its classes
    admission.check_targets(["cat", "dog", "predicted", "runner-up"], entry, 4)
    with pytest.raises(BadParameterError, match="10 explanations to render, over the limit of 4"):
        admission.check_targets(["all"], entry, 4)  # all = every one of its 10 classes


def test_a_callback_is_kept_sealed_and_only_to_an_allowed_host(settings):
    url = "https://hooks.example.org/aex?token=s3cret"
    with pytest.raises(BadParameterError, match="callbacks are disabled"):
        admission.job_meta("image", ClassifyParams(callback_url=url), settings)
    allowed = settings.model_copy(update={"callback_allowed_hosts": ["*.example.org"]})
    meta = admission.job_meta("image", ClassifyParams(callback_url=url), allowed)
    assert meta["input_format"] == "image" and "s3cret" not in json.dumps(meta)
    assert meta["callback"]["display_url"] == "https://hooks.example.org/aex"
    with pytest.raises(BadParameterError, match="is not allowed"):
        admission.job_meta("image", ClassifyParams(callback_url="https://evil.example.com/x"), allowed)
    assert admission.job_meta("image", ClassifyParams(), settings) == {"input_format": "image"}
