"""Provenance in every result, reuse of finished results, determinism, and the stability
score against the ARA radii the checkpoint records (real Redis, real workers; marker e2e)."""

from __future__ import annotations

import hashlib
import json
import re
import time

import numpy as np
import pytest

from jobs.settings import Settings
from models.defaults import ARA_EPS, ARA_MOMENTUM, ARA_OVERSHOOT, ARA_STEPS
from models.perturb.stability import percentile_of
from models.render.png import to_png_bytes
from models.store.header import read_checkpoint_metadata
from tests.support.checkpoints import stability_reference_images
from tests.support.stack import poll_job
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e


def upload(data: bytes, name: str = "x.png", **fields):
    return {"files": {"image": (name, data, "image/png")}, "data": {k: str(v) for k, v in fields.items()}}


def jobs_total(client, kind: str, outcome: str) -> float:
    match = re.search(
        rf'^aex_jobs_total{{kind="{kind}",outcome="{outcome}"}} (\S+)$', client.get("/metrics").text, re.M
    )
    return float(match.group(1)) if match else 0.0


def file_sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_classify_result_carries_its_provenance(api, service_models, make_image):
    data = make_image("PNG", "L", seed=21)
    resp = api.post("/v1/classify", **upload(data, model="tiny-grey", top_k=2))
    assert resp.status_code == 200, resp.text
    result = resp.json()["result"]
    assert result["reused"] is False and "stability" not in result
    prov = result["provenance"]
    path = service_models / "tiny-grey.safetensors"
    meta = read_checkpoint_metadata(path)
    assert prov["model"] == "tiny-grey" and prov["kind"] == "classify"
    assert prov["checkpoint_sha256"] == file_sha256(path) and prov["weights_sha256"] == meta["weights_sha256"]
    # The checkpoint's scalar metrics, every one of them; its nested records are the model list's.
    scalars = {k: v for k, v in meta["metrics"].items() if isinstance(v, (bool, int, float, str))}
    assert prov["checkpoint_metrics"] == scalars and scalars["test_accuracy"] == meta["metrics"]["test_accuracy"]
    assert "ara_radii" in meta["metrics"] and "ara_radii" not in prov["checkpoint_metrics"]
    assert prov["parameters"] == {
        "top_k": 2,
        "stability": False,
        "stability_steps": None,
        "stability_mode": None,
        "window": None,
    }
    assert prov["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert prov["input"] == {"format": "png", "mode": "L", "width": 48, "height": 40}
    for package in ("aex", "python", "torch", "torchvision", "numpy", "pydicom", "highdicom"):
        assert prov["software"][package], package
    assert prov["device"]["type"] == "cpu" and prov["device"]["torch_threads"] == 1
    assert prov["determinism"]["deterministic_algorithms"] is True
    assert prov["timings"]["total_seconds"] > 0 and prov["timings"]["inference_seconds"] > 0
    assert len(prov["cache_key"]) == 64 and prov["worker"]
    # The model list shows the same file hash, and no radii arrays either.
    entry = api.get("/v1/models/tiny-grey").json()
    assert entry["checkpoint_sha256"] == prov["checkpoint_sha256"] and "attack" not in entry["metrics"]["ara_radii"]
    assert entry["metrics"]["ara_radii"]["n"] == 6 and entry["metrics"].items() >= prov["checkpoint_metrics"].items()


def test_explain_provenance_names_every_method_parameter(api, make_image, poll):
    default_layer = api.get("/v1/models/tiny-rgb").json()["gradcam_layer"]
    resp = api.post(
        "/v1/explain",
        **upload(make_image("PNG", "RGB", seed=22), model="tiny-rgb", targets="predicted,cat", steps=4, rho=0.08),
    )
    view = poll(api, resp.headers["location"])
    assert view["status"] == "finished", view
    prov = view["result"]["provenance"]
    assert prov["parameters"] == {
        "targets": ["predicted", "cat"],
        "rho": 0.08,
        "steps": 4,
        "layer": default_layer,
        "stability_steps": 20,
        "stability_mode": "fast",
        "window": None,
    }
    explain = prov["method"]["explain"]
    assert explain["rho"] == 0.08 and explain["steps"] == 4 and explain["overshoot"] == 5.0
    assert explain["clamp"] is False and explain["momentum"] == 0.0 and explain["bound_check"] is True
    assert prov["method"]["gradcam"]["layer"] == default_layer
    assert prov["method"]["stability"] == {
        "searches": {"attack": "l2min", "btr": "btr"},
        "steps": 20,
        "eps": ARA_EPS,
        "overshoot": ARA_OVERSHOOT,
        "momentum": ARA_MOMENTUM,
        "clamp": False,
        # 20 steps: too few for the fast search to save anything, so the exact one ran.
        "mode": "exact",
    }
    assert {"decode_seconds", "explain_seconds", "stability_seconds", "total_seconds"} <= set(prov["timings"])
    # Explain results always carry the stability score; tiny-rgb records no radii to rank it by.
    stability = view["result"]["stability"]
    assert stability["attack_rms"] > 0 and stability["attack_percentile"] is None
    assert stability["reference"] is None and "no per-image ARA radii" in stability["summary"]


def test_an_identical_request_is_answered_from_the_first_result(api, make_image, poll):
    data = make_image("PNG", "RGB", seed=23)
    fields = dict(model="tiny-rgb", targets="predicted,runner-up", steps=5, rho=0.1)
    first = poll(api, api.post("/v1/explain", **upload(data, **fields)).headers["location"])
    assert first["status"] == "finished" and first["result"]["reused"] is False
    finished, reused = jobs_total(api, "explain", "finished"), jobs_total(api, "explain", "reused")

    resp = api.post("/v1/explain", **upload(data, "other-name.png", **fields))
    assert resp.status_code == 200, resp.text  # finished at once: nothing queued
    second = resp.json()
    assert second["status"] == "finished" and second["id"] != first["id"]
    result = second["result"]
    assert result["reused"] is True and "reused_from" not in result
    assert first["id"] not in resp.text  # the first job's id is never shown
    # The very numbers the first job computed, with its provenance (its timings, worker, time).
    for key in ("probs", "targets", "stability", "provenance", "gradcam"):
        strip = lambda ts: [{k: v for k, v in t.items() if not k.endswith("_url")} for t in ts]
        a, b = first["result"][key], result[key]
        assert (strip(a) == strip(b)) if key == "targets" else (a == b), key
    assert set(second["images"]) == set(first["images"])
    for name, url in second["images"].items():
        assert url.startswith(second["url"])
        assert api.get(url).content == api.get(first["images"][name]).content
    assert jobs_total(api, "explain", "finished") == finished  # no worker ran it
    assert jobs_total(api, "explain", "reused") == reused + 1

    # Naming the default layer is the same request; any changed parameter is a new one.
    layer = api.get("/v1/models/tiny-rgb").json()["gradcam_layer"]
    same = api.post("/v1/explain", **upload(data, **fields, layer=layer)).json()
    assert same["status"] == "finished" and same["result"]["reused"] is True and same["id"] != first["id"]
    for change in ({"rho": 0.05}, {"steps": 6}, {"targets": "predicted"}, {"stability_steps": 21}):
        resp = api.post("/v1/explain", **upload(data, **{**fields, **change}))
        assert resp.status_code == 202, (change, resp.text)
        view = poll(api, resp.headers["location"])
        assert view["status"] == "finished" and view["result"]["reused"] is False, change
        assert view["result"]["provenance"]["cache_key"] != first["result"]["provenance"]["cache_key"]
    assert jobs_total(api, "explain", "finished") == finished + 4

    # Classify too: the second answer is the first's result.
    one = api.post("/v1/classify", **upload(data, model="tiny-rgb")).json()
    two = api.post("/v1/classify", **upload(data, model="tiny-rgb")).json()
    assert one["result"]["reused"] is False and two["result"]["reused"] is True and one["id"] not in json.dumps(two)
    assert two["result"]["probs"] == one["result"]["probs"]
    other_k = api.post("/v1/classify", **upload(data, model="tiny-rgb", top_k=3)).json()
    assert other_k["result"]["reused"] is False


def test_the_same_request_computed_twice_gives_the_same_numbers(service_stack, make_image, poll):
    """With reuse off, two workers compute the same request independently: identical results."""
    with api_client(service_stack.model_copy(update={"reuse_results": False})) as client:
        data = make_image("PNG", "RGB", seed=24)
        urls = [
            client.post(
                "/v1/explain", **upload(data, model="tiny-rgb", targets="predicted,runner-up", steps=5)
            ).headers["location"]
            for _ in range(2)
        ]
        views = [poll(client, url) for url in urls]
    a, b = (v["result"] for v in views)
    assert a["reused"] is False and b["reused"] is False
    assert a["probs"] == b["probs"] and a["stability"] == b["stability"]
    assert [t["rms"] for t in a["targets"]] == [t["rms"] for t in b["targets"]]
    assert [t["prob_after"] for t in a["targets"]] == [t["prob_after"] for t in b["targets"]]
    assert a["provenance"]["cache_key"] == b["provenance"]["cache_key"]
    with api_client(service_stack) as client:
        for name in views[0]["images"]:
            assert client.get(views[0]["images"][name]).content == client.get(views[1]["images"][name]).content


def test_stability_equals_the_ara_radius_of_a_test_image(service_stack, service_models):
    """tiny-grey records the ARA radii of six images (tests/support/checkpoints.py); classifying one of
    them with stability=true gives back its own radius, ranked among the six."""
    radii = read_checkpoint_metadata(service_models / "tiny-grey.safetensors")["metrics"]["ara_radii"]
    assert radii["settings"]["steps"] == ARA_STEPS == Settings().stability_steps  # the default is the ARA's
    index = 2
    png = to_png_bytes(stability_reference_images()[index])
    with api_client(service_stack.model_copy(update={"classify_wait_seconds": 0.0})) as client:
        resp = client.post(
            "/v1/classify",
            # The exact search: the ARA's own, so the score is the recorded radius itself.
            **upload(png, model="tiny-grey", stability="true", stability_steps=ARA_STEPS, stability_mode="exact"),
        )
        assert resp.status_code == 202, resp.text
        seen = []
        deadline = time.monotonic() + 300
        while True:
            view = client.get(resp.headers["location"]).json()
            if view["progress"]:
                seen.append(view["progress"])
            if view["status"] in ("finished", "failed", "cancelled") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert view["status"] == "finished", view
    total = 2 * (ARA_STEPS + 1)
    assert any(p["phase"] == "stability" and 0 < p["done"] < p["total"] == total for p in seen), seen[:5]
    assert view["progress"] == {"done": total, "total": total, "phase": "stability"}

    score = view["result"]["stability"]
    assert score["predicted"] == view["result"]["predicted"]["class_index"]
    for name in ("attack", "btr"):
        assert score[f"{name}_rms"] == pytest.approx(radii[name][index], rel=1e-4, abs=1e-6)
        assert score[f"{name}_percentile"] == percentile_of(score[f"{name}_rms"], radii[name])
    assert score["reference_n"] == 6 and score["comparable"] is True
    assert score["reference"]["settings"]["eps"] == ARA_EPS
    assert f"more stable than {score['attack_percentile']:.0f}%" in score["summary"]
    assert view["result"]["provenance"]["timings"]["stability_seconds"] > 0


def test_stability_with_fewer_steps_is_marked_not_comparable(api, make_image):
    """The test stack's default (20 steps) is not the ARA's: reported, but not comparable."""
    resp = api.post("/v1/classify", **upload(make_image("PNG", "L", seed=25), model="tiny-grey", stability="true"))
    assert resp.status_code == 200, resp.text
    score = resp.json()["result"]["stability"]
    assert score["settings"]["steps"] == 20 and score["comparable"] is False
    assert score["attack_percentile"] is not None and score["reference_n"] == 6
    assert np.isfinite(score["attack_rms"]) and score["attack_rms"] >= 0


def test_a_fast_score_estimates_the_ara_radius_and_says_what_it_ranks_against(api, service_models):
    """The default mode at the ARA's 450 steps: the fast search, within 15% of the radius the
    exact search recorded for this image; tiny-grey records no fast radii, so its percentiles
    rank against the exact ones and the report says they are not like against like."""
    radii = read_checkpoint_metadata(service_models / "tiny-grey.safetensors")["metrics"]["ara_radii"]
    index = 3
    resp = api.post(
        "/v1/classify",
        **upload(
            to_png_bytes(stability_reference_images()[index]),
            model="tiny-grey",
            stability="true",
            stability_steps=ARA_STEPS,
        ),
    )
    view = poll_job(api, resp.headers["location"]) if resp.status_code == 202 else resp.json()
    assert view["status"] == "finished", view
    score = view["result"]["stability"]
    assert (
        score["settings"]["mode"] == "fast" and view["result"]["provenance"]["parameters"]["stability_mode"] == "fast"
    )
    assert view["result"]["provenance"]["method"]["stability"]["mode"] == "fast"
    for name in ("attack", "btr"):
        assert score[f"{name}_rms"] == pytest.approx(radii[name][index], rel=0.15)
    assert score["comparable"] is False and score["reference"]["settings"].get("mode", "exact") == "exact"
