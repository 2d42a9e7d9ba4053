"""Typed results (``jobs.results``): real classify and explain results from the worker's computation
validate and round-trip to the same JSON, name every key, and the OpenAPI schema describes them."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import TypeAdapter

from jobs.crypto import generate_data_key
from jobs.params import ClassifyParameters, ExplainParameters
from jobs.results import ClassifyResult, ExplainResult, JobResult, ResultModel
from jobs.settings import Settings
from service.app import create_app
from service.schemas import JobView, Timings
from tests.conftest import _tiny_checkpoint, write_dicom
from worker.compute import JobInput, classify_result, classify_results
from worker.explaining import explain_result
from worker.served import ServedModel

RESULT = TypeAdapter(JobResult)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> ServedModel:
    path = tmp_path_factory.mktemp("results") / "tiny-grey.safetensors"
    _tiny_checkpoint(path, 1, 28, ["normal", "pneumonia"], seed=1)
    return ServedModel.load("tiny-grey", path, torch.device("cpu"))


@pytest.fixture(autouse=True)
def _limits(monkeypatch):
    monkeypatch.setattr("worker.compute.upload_limits", lambda: (50_000_000, 20))


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((36, 40)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def dicom() -> bytes:
    yy, xx = np.mgrid[0:64, 0:80]
    return write_dicom((xx * 4 + yy * 2).clip(0, 4095).astype(np.uint16), "MONOCHROME2", 1.0, 0.0, (1800, 3600))


def explain_parameters(served: ServedModel) -> ExplainParameters:
    return ExplainParameters.build(
        targets=["predicted", "runner-up"], rho=0.1, steps=3, layer=served.gradcam_layer, stability_steps=2
    )


def unnamed_keys(model: Any, where: str = "result") -> list[str]:
    """Every key of a validated result that no model names (kept by extra="allow")."""
    if isinstance(model, list):
        return [k for i, v in enumerate(model) for k in unnamed_keys(v, f"{where}[{i}]")]
    if not isinstance(model, ResultModel):
        return []
    out = [f"{where}.{k}" for k in model.model_extra or {}]
    for name in type(model).model_fields:
        out += unnamed_keys(getattr(model, name), f"{where}.{name}")
    return out


def assert_round_trip(stored: dict[str, Any], kind: type) -> None:
    """The JSON rq stores reads back as ``kind`` and writes out as the very same text."""
    text = json.dumps(stored)
    model = RESULT.validate_json(text)
    assert type(model) is kind
    assert unnamed_keys(model) == []  # the models describe every key the worker writes
    assert json.dumps(RESULT.dump_python(model, mode="json")) == text
    view = JobView(id="j", url="/v1/jobs/j", kind=None, status="finished", timings=Timings(), result=json.loads(text))
    assert json.dumps(view.model_dump(mode="json")["result"]) == text


def test_real_classify_results_round_trip(served):
    plain = classify_result(served, png(), "image", ClassifyParameters.build(top_k=1)).dump()
    assert "stability" not in plain and len(plain["top"]) == 1  # not computed: not written, not null
    assert_round_trip(plain, ClassifyResult)
    scored = classify_result(
        served, png(), "image", ClassifyParameters.build(stability=True, stability_steps=3, stability_mode="exact")
    ).dump()
    assert scored["stability"]["settings"]["mode"] == "exact"
    assert scored["provenance"]["parameters"]["stability_mode"] == "exact"
    assert_round_trip(scored, ClassifyResult)


def test_a_batch_is_named_inputs_and_a_bad_input_gets_its_own_error(served):
    params = ClassifyParameters.build(top_k=2)
    out = classify_results(served, [JobInput(png(1), "image", params), JobInput(b"not an image", "image", params)])
    assert isinstance(out[0], ClassifyResult) and isinstance(out[1], Exception)
    assert out[0].provenance.method["batch_size"] == 1


@pytest.mark.parametrize("source", ["image", "dicom"])
def test_real_explain_results_round_trip(served, source):
    data = png() if source == "image" else dicom()
    output = explain_result(served, data, source, explain_parameters(served), bound_check=False)
    stored = output.result.dump()
    assert set(output.files) == {
        *stored["files"].values(),
        *(t[k] for t in stored["targets"] for k in ("image", "difference")),
    }
    if source == "image":
        assert "dicom_files" not in stored and all("dicom" not in t for t in stored["targets"])
        assert output.dicom_files == {}
    else:
        assert set(stored["dicom_files"]) == set(output.dicom_files)
        assert stored["provenance"]["input"]["format"] == "dicom"
    assert_round_trip(stored, ExplainResult)


def test_view_urls_and_unknown_keys_pass_through(served):
    stored = explain_result(served, png(), "image", explain_parameters(served), bound_check=False).result.dump()
    stored["targets"][0]["image_url"] = "/v1/jobs/j/images/" + stored["targets"][0]["image"]
    stored["added_by_a_newer_worker"] = {"x": 1}
    stored["provenance"]["method"]["new_setting"] = 2
    stored["provenance"]["parameters"]["new_parameter"] = 3
    stored["targets"][1]["new_figure"] = 0.5
    view = JobView(id="j", url="/v1/jobs/j", kind=None, status="finished", timings=Timings(), result=stored)
    assert view.model_dump(mode="json")["result"] == stored
    assert view.result.targets[0].image_url == stored["targets"][0]["image_url"]


def test_the_openapi_schema_describes_both_results():
    settings = Settings(
        redis_url="unix:///nonexistent.sock", bundled_models=False, model_dirs=[], data_key=generate_data_key()
    )
    spec = create_app(settings).openapi()
    schemas = spec["components"]["schemas"]
    result = schemas["JobView"]["properties"]["result"]
    refs = json.dumps(result)
    assert "#/components/schemas/ClassifyResult" in refs and "#/components/schemas/ExplainResult" in refs
    classify, explain = schemas["ClassifyResult"], schemas["ExplainResult"]
    assert {"model", "predicted", "top", "probs", "stability", "reused", "provenance", "seconds"} <= set(
        classify["properties"]
    )
    assert {"model", "predicted", "runner_up", "targets", "gradcam", "files", "stability", "provenance"} <= set(
        explain["properties"]
    )
    assert {"image_url", "difference_url", "dicom_url", "dicom_difference_url", "faithfulness"} <= set(
        schemas["Target"]["properties"]
    )
    assert {"parameters", "method", "cache_key", "input"} <= set(schemas["Provenance"]["properties"])
    assert schemas["StabilityMode"]["enum"] == ["fast", "exact"]
