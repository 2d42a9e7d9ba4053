"""No job finishes with a number that is not finite (``worker.compute``, ``worker.explaining``):
images at the edges of their ranges, decoded by the worker's own path and run through a tiny
real model, classify and explain with every number finite; a real checkpoint whose computation
goes NaN (written by the project's checkpoint writer) fails with non_finite_result, whether its
logits are NaN (checked before anything is computed from them) or only what is computed from its
gradients (an explanation's x + delta, checked before any picture is rendered), which no check
of the input can see."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.params import ClassifyParameters, ExplainParameters
from models.errors import NonFiniteResultError, UnsupportedMediaError
from tests.support.checkpoints import tiny_served
from tests.support.dicom import write_dicom
from tests.support.edge_images import F32_MAX, F32_TINY, bands, nan_checkpoint, raw_tiff, unexpected_nulls
from worker.compute import JobInput, classify_result, classify_results
from worker.explaining import explain_result, explain_results
from worker.served import ServedModel

GREY = ["normal", "pneumonia"]


pytestmark = pytest.mark.usefixtures("loose_upload_limits")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> ServedModel:
    return tiny_served(tmp_path_factory.mktemp("non-finite"), "tiny-grey", 1, 28, GREY, seed=1)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """broken(kind) -> a ServedModel of ``tests.support.edge_images.nan_checkpoint(kind)``."""
    folder = tmp_path_factory.mktemp("nan-models")
    return lambda kind: ServedModel.load(
        kind, nan_checkpoint(folder / f"{kind}.safetensors", kind), torch.device("cpu")
    )


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((36, 40)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png16(values) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(bands(values, np.uint16, height=40, width=12)).save(buf, "PNG")
    return buf.getvalue()


EDGE_INPUTS = {
    # the audit's file: finite float32 values whose float32 scaling overflowed to NaN
    "float32 +-max tiff": (raw_tiff(bands((F32_MAX, -F32_MAX, 0.0), np.float32, height=40, width=12)), "image"),
    "float32 subnormal tiff": (raw_tiff(bands((F32_TINY, 0.0, -F32_TINY), np.float32, height=40, width=12)), "image"),
    "float32 all-equal tiff": (raw_tiff(np.full((40, 36), 3e38, np.float32)), "image"),
    "int32 extremes tiff": (raw_tiff(bands((2**31 - 1, -(2**31), 0), np.int32, height=40, width=12)), "image"),
    "uint32 extremes tiff": (raw_tiff(bands((2**32 - 1, 0, 2**31), np.uint32, height=40, width=12)), "image"),
    "16-bit png extremes": (png16((65535, 0, 1)), "image"),
    "dicom slope 1e308, intercept -1e308": (
        write_dicom(bands((1, 0, 1), np.uint16, height=40, width=12), "MONOCHROME2", 1e308, -1e308),
        "dicom",
    ),
    "dicom subnormal slope": (write_dicom(bands((4095, 0, 1), np.uint16, 40, 12), "MONOCHROME1", 5e-324, 0.0), "dicom"),
}


@pytest.mark.parametrize("name", list(EDGE_INPUTS))
def test_inputs_at_the_edges_of_their_ranges_classify_with_finite_numbers(served, name):
    data, source = EDGE_INPUTS[name]
    parameters = ClassifyParameters.build(top_k=2, stability=True, stability_steps=3, stability_mode="exact")
    result = classify_result(served, data, source, parameters).dump()
    assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in result["probs"].values()), result["probs"]
    assert sum(result["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    assert unexpected_nulls(result) == []


@pytest.mark.parametrize("name", ["float32 +-max tiff", "dicom slope 1e308, intercept -1e308"])
def test_inputs_at_the_edges_of_their_ranges_explain_with_finite_numbers(served, name):
    data, source = EDGE_INPUTS[name]
    parameters = ExplainParameters.build(targets=["predicted", "runner-up"], rho=0.1, steps=3, stability_steps=2)
    out = explain_result(served, data, source, parameters, bound_check=False)
    result = out.result.dump()
    assert all(isinstance(p, float) for p in result["probs"].values())
    assert unexpected_nulls(result) == []
    assert out.files and all(png.startswith(b"\x89PNG") for png in out.files.values())


def test_a_model_whose_logits_are_nan_fails_each_job_with_non_finite_result(broken):
    model = broken("inf-weights")
    with torch.no_grad():  # what the checkpoint computes: NaN, for any input in [0, 1]
        assert torch.isnan(model.model(torch.rand(1, 1, 28, 28))).all()
    with pytest.raises(NonFiniteResultError) as info:
        classify_result(model, png(), "image", ClassifyParameters.build(stability=True, stability_steps=3))
    assert info.value.code == "non_finite_result" and "logits" in info.value.message
    parameters = ExplainParameters.build(targets=["predicted"], rho=0.1, steps=3, stability_steps=2)
    with pytest.raises(NonFiniteResultError) as info:
        explain_result(model, png(), "image", parameters, bound_check=False)
    assert "logits" in info.value.message


def flat_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_in_a_batch_each_job_gets_its_own_error(broken):
    model = broken("overflowing-classifier")  # finite logits for mid-grey, -inf for black
    params = ClassifyParameters.build(top_k=1)
    batch = [JobInput(flat_png(128), "image", params), JobInput(flat_png(0), "image", params)]
    out = classify_results(model, [*batch, JobInput(b"not an image", "image", params)])
    assert isinstance(out[1], NonFiniteResultError) and "logits" in out[1].message
    assert isinstance(out[2], UnsupportedMediaError)
    assert unexpected_nulls(out[0].dump()) == [], "the finite job of the batch finishes"
    assert out[0].provenance.method["batch_size"] == 1  # the rest of the batch went on without it
    parameters = ExplainParameters.build(targets=["predicted"], rho=0.1, steps=3, stability_steps=2)
    out = explain_results(broken("inf-weights"), [JobInput(png(2), "image", parameters)] * 2, bound_check=False)
    assert all(isinstance(o, NonFiniteResultError) for o in out)


def test_the_result_boundary_catches_what_the_input_and_logit_checks_cannot(broken):
    model = broken("backward-overflow")
    x = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png())).resize((28, 28)), dtype=np.float32) / 255.0)
    with torch.no_grad():  # its logits are finite: only what is computed from its gradients is not
        assert torch.isfinite(model.model(x[None, None])).all()
    classified = classify_result(model, png(), "image", ClassifyParameters.build(top_k=2)).dump()
    assert unexpected_nulls(classified) == []  # classifying needs no gradient: it stands
    parameters = ExplainParameters.build(targets=["predicted", "runner-up"], rho=0.1, steps=3, stability_steps=2)
    with pytest.raises(NonFiniteResultError) as info:
        explain_result(model, png(), "image", parameters, bound_check=False)
    assert info.value.code == "non_finite_result"
    assert "of the explanation holds" in info.value.message and "no picture or result is made" in info.value.message
