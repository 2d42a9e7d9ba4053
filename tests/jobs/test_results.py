"""Typed results (``jobs.results``): real classify and explain results from the worker's computation
validate and round-trip to the same JSON, name every key, and the OpenAPI schema describes them;
a NaN or an infinity anywhere in one (a named field, a free-form dict, a kept extra key, its JSON)
is refused with non_finite_result naming where."""

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
from jobs.finite import non_finite_paths
from jobs.params import ClassifyParameters, ExplainParameters
from jobs.results import ClassifyResult, ExplainResult, JobResult, ResultModel
from jobs.settings import Settings
from models.errors import NonFiniteResultError
from service.app import create_app
from service.schemas import JobView, Timings
from tests.support.checkpoints import tiny_checkpoint
from tests.support.dicom import write_dicom
from worker.compute import JobInput, classify_result, classify_results
from worker.explaining import explain_result
from worker.served import ServedModel

RESULT = TypeAdapter(JobResult)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> ServedModel:
    path = tmp_path_factory.mktemp("results") / "tiny-grey.safetensors"
    tiny_checkpoint(path, 1, 28, ["normal", "pneumonia"], seed=1)
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


# --- Every number finite: a NaN or an infinity anywhere is non_finite_result, never a null ------


def set_at(value: dict, path: list, new) -> dict:
    """``value`` (a JSON dict, copied) with ``new`` at ``path`` (keys and list indices)."""
    out = json.loads(json.dumps(value))
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return out


@pytest.fixture(scope="module")
def stored_results(served) -> dict[str, dict[str, Any]]:
    """Real results as rq stores them: a classify with stability, an explain on DICOM input."""
    classify = ClassifyParameters.build(top_k=2, stability=True, stability_steps=3, stability_mode="exact")
    return {
        "classify": classify_result(served, png(), "image", classify).dump(),
        "explain": explain_result(
            served, dicom(), "dicom", explain_parameters(served), bound_check=False
        ).result.dump(),
    }


WHERE = [
    ("classify", ["probs", "pneumonia"], "probs.pneumonia"),
    ("classify", ["top", 0, "prob"], "top[0].prob"),
    ("classify", ["stability", "attack_rms"], "stability.attack_rms"),
    ("classify", ["provenance", "timings", "decode_seconds"], "provenance.timings.decode_seconds"),
    ("classify", ["provenance", "method", "stability", "eps"], "provenance.method.stability.eps"),  # free-form
    ("explain", ["targets", 1, "rms"], "targets[1].rms"),
    ("explain", ["targets", 0, "faithfulness", "deletion_curve", 2], "targets[0].faithfulness.deletion_curve[2]"),
    ("explain", ["gradcam", "faithfulness", "insertion_auc"], "gradcam.faithfulness.insertion_auc"),
    ("explain", ["stability", "btr_rms"], "stability.btr_rms"),
    ("explain", ["provenance", "input", "rescale_slope"], "provenance.input.rescale_slope"),
    ("explain", ["a_key_a_newer_worker_adds"], "a_key_a_newer_worker_adds"),  # kept by extra="allow"
]


@pytest.mark.parametrize("kind, path, named", WHERE, ids=[w[2] for w in WHERE])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_result_with_a_non_finite_number_anywhere_is_refused_naming_where(stored_results, kind, path, named, bad):
    stored = stored_results[kind]
    assert_round_trip(stored, ClassifyResult if kind == "classify" else ExplainResult)  # finite: fine
    broken = set_at(stored, path, bad)
    for validate in (RESULT.validate_python, lambda v: RESULT.validate_json(json.dumps(v))):  # JSON's NaN too
        with pytest.raises(NonFiniteResultError) as info:
            validate(broken)
        assert info.value.code == "non_finite_result" and named in info.value.message


def test_every_non_finite_number_is_counted_and_a_few_named(stored_results):
    stored = stored_results["classify"]
    broken = set_at(stored, ["probs"], {name: float("nan") for name in stored["probs"]})
    broken["top"] = [{**t, "prob": float("nan")} for t in stored["top"]]
    broken["predicted"]["prob"] = float("nan")
    with pytest.raises(NonFiniteResultError) as info:
        ClassifyResult.model_validate(broken)
    assert "holds 5 numbers that are NaN or infinite" in info.value.message and "and 0 more" not in info.value.message
    broken["seconds"] = float("inf")
    with pytest.raises(NonFiniteResultError) as info:
        ClassifyResult.model_validate(broken)
    assert "holds 6 numbers" in info.value.message and "and 1 more" in info.value.message


def test_a_part_set_after_validation_is_checked_again_at_dump(stored_results):
    result = ClassifyResult.model_validate(stored_results["classify"])
    result.predicted.prob = float("nan")
    with pytest.raises(NonFiniteResultError) as info:
        result.dump()
    assert "predicted.prob" in info.value.message


def test_nulls_integers_and_booleans_are_not_numbers_to_refuse():
    assert non_finite_paths({"a": None, "b": [1, True, 10**400], "c": "nan", "d": 1e308, "e": -0.0}) == []
    assert non_finite_paths({"a": [0.5, {"b": float("nan")}], "c": np.float32("inf")}) == ["a[1].b", "c"]
