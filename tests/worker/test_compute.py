"""classify's forward pass (``worker.compute.forward_checked``) on the CPU runs the fused inference copy (``models.nn.inference``) made once at load (``ServedModel.classifier``): a batch's probabilities equal the served model's own to float rounding, with and without the stability search, and the served model is left as it was; the copy, first made in inference mode, still serves an explanation's searches."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.params import ClassifyParameters, ExplainParameters
from models.nn.inference import inference_copy
from tests.support.checkpoints import tiny_served
from worker.compute import JobInput, classify_results, decode_batch
from worker.explaining import explain_result
from worker.served import ServedModel

CLASSES = ["a", "b", "c", "d"]


pytestmark = pytest.mark.usefixtures("loose_upload_limits")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> ServedModel:
    return tiny_served(tmp_path_factory.mktemp("compute"), "tiny-rgb", 3, 32, CLASSES, seed=3)


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("stability", [False, True])
def test_a_batch_classifies_through_the_fused_copy_as_the_model_does(served, stability):
    model = served.model
    flags = [p.requires_grad for p in model.parameters()]
    copy = inference_copy(model)  # built by ServedModel.load, and kept: its classifier, as a frozen graph
    assert isinstance(served.classifier, torch.jit.ScriptModule)
    parameters = ClassifyParameters(top_k=2, stability=stability, stability_steps=40 if stability else None)
    inputs = [JobInput(png(i), "image", parameters) for i in range(5)]
    out = classify_results(served, inputs)
    assert inference_copy(model) is copy
    _, decoded = decode_batch(served, inputs)
    xs = torch.stack([d.x for d in decoded])
    with torch.inference_mode():  # the graph's logits are the copy's bit for bit (models.nn.graph)
        assert torch.equal(served.classifier(xs.contiguous(memory_format=torch.channels_last)), copy(xs))
    with torch.no_grad():
        want = model(xs).softmax(1)
    for result, row in zip(out, want, strict=True):
        got = torch.tensor([result.probs[c] for c in CLASSES])
        torch.testing.assert_close(got, row, rtol=0, atol=1e-5)
        assert result.predicted.class_index == int(row.argmax())
        assert (result.stability is not None) == stability
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.is_contiguous() for p in model.parameters())  # still NCHW


def test_an_explanation_searches_through_the_copy_classify_made(served):
    # The copy classify's forward pass (and the worker's warm-up) made under inference_mode
    # is the one the explanation's search takes (models.nn.layout): it must support autograd.
    classify_results(served, [JobInput(png(9), "image", ClassifyParameters())])
    parameters = ExplainParameters.build(targets=["predicted", "runner-up"], rho=0.1, steps=3, stability_steps=4)
    out = explain_result(served, png(9), "image", parameters)
    assert [t.class_index for t in out.result.targets][:1] == [out.result.predicted.class_index]


@pytest.mark.parametrize("stability", [False, True])
def test_a_classify_result_hands_over_the_json_it_was_validated_from(served, stability):
    """A classify result is built as JSON values, validated once and stored as they are
    (``ResultModel.from_json``): what its first dump hands over is exactly what dumping the
    validated model gives, and a change to the model drops it."""
    parameters = ClassifyParameters(top_k=3, stability=stability, stability_steps=40 if stability else None)
    [result] = classify_results(served, [JobInput(png(11), "image", parameters)])
    handed = result.dump()
    assert handed == result.model_dump(mode="json") == result.dump()  # the later dumps write it out
    assert set(handed) == {"model", "predicted", "top", "probs", "reused", "provenance", "seconds"} | (
        {"stability"} if stability else set()
    )
    [again] = classify_results(served, [JobInput(png(11), "image", parameters)])
    again.reused = True
    assert again.dump()["reused"] is True
