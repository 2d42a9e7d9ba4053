"""End-to-end: the API (in-process ASGI client) against a real Redis and two real worker
processes serving tiny checkpoints (marker e2e: they start processes and run jobs)."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.tensors import load_image_for_model
from models.render.png import to_uint8_image
from models.store.checkpoint import load_checkpoint
from tests.support.tokens import api_client

pytestmark = pytest.mark.e2e


def direct_probs(models_dir, name: str, data: bytes) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """What the model itself says about the image: (probs, classes, input tensor)."""
    path = models_dir / name / "model.safetensors"
    if not path.exists():
        path = models_dir / f"{name}.safetensors"
    model, meta = load_checkpoint(path)
    x = load_image_for_model(data, meta.input_size, meta.in_channels)
    with torch.no_grad():
        return model(x[None]).softmax(1)[0], meta.classes, x


def upload(data: bytes, name: str = "image.png", **fields):
    return {
        "files": {"image": (name, data, "application/octet-stream")},
        "data": {k: str(v) for k, v in fields.items()},
    }


FORMATS = [
    ("PNG", "RGB"),
    ("JPEG", "RGB"),
    ("TIFF", "RGB"),
    ("BMP", "RGB"),
    ("WEBP", "RGB"),
    ("PNG", "L"),
    ("PNG", "RGBA"),
    ("PNG", "P"),
    ("PNG", "I;16"),
    ("TIFF", "I;16"),
]


@pytest.mark.parametrize("fmt,mode", FORMATS)
@pytest.mark.parametrize("model", ["tiny-rgb", "tiny-grey"])
def test_classify_gives_the_models_own_probabilities(api, service_models, make_image, fmt, mode, model):
    data = make_image(fmt, mode)
    resp = api.post("/v1/classify", **upload(data, f"x.{fmt.lower()}", model=model, top_k=3))
    assert resp.status_code == 200, resp.text
    view = resp.json()
    assert view["status"] == "finished" and view["kind"] == "classify" and view["model"] == model
    probs, classes, _ = direct_probs(service_models, model, data)
    got = view["result"]["probs"]
    assert list(got) == classes
    np.testing.assert_allclose([got[c] for c in classes], probs.numpy(), rtol=1e-5, atol=1e-6)
    top = view["result"]["top"]
    assert len(top) == min(3, len(classes))
    assert top[0]["class_index"] == int(probs.argmax()) == view["result"]["predicted"]["class_index"]
    t = view["timings"]
    assert t["queued_seconds"] >= 0 and t["run_seconds"] > 0 and t["ended_at"] >= t["started_at"]


def test_classify_answers_202_when_the_wait_is_over(service_stack, make_image, poll):

    with api_client(service_stack.model_copy(update={"classify_wait_seconds": 0.0})) as client:
        # An image of its own: one classified before would be answered at once from its result.
        # With its stability score (searches of hundreds of steps, exact mode): a plain classify
        # of a tiny model can end before the API reads the job back, answered 200 then.
        fields = {"model": "tiny-rgb", "stability": "true", "stability_steps": 300, "stability_mode": "exact"}
        resp = client.post("/v1/classify", **upload(make_image("PNG", "RGB", seed=7402), **fields))
        assert resp.status_code == 202, resp.text
        assert resp.headers["location"] == resp.json()["url"]
        view = poll(client, resp.headers["location"])
        assert view["status"] == "finished" and "probs" in view["result"]


def png_size(data: bytes) -> tuple[tuple[int, int], str]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.load()
    return img.size, img.mode


@pytest.mark.parametrize("model,size,fmt,mode", [("tiny-rgb", 32, "JPEG", "RGB"), ("tiny-grey", 28, "PNG", "I;16")])
def test_explain_end_to_end(api, service_stack, service_models, make_image, poll, model, size, fmt, mode):
    data = make_image(fmt, mode, size=(64, 50))
    targets = "predicted,runner-up,cat" if model == "tiny-rgb" else "predicted,pneumonia"
    resp = api.post("/v1/explain", **upload(data, model=model, targets=targets, steps=5, rho=0.1))
    assert resp.status_code == 202, resp.text
    location = resp.headers["location"]
    assert location == f"/v1/jobs/{resp.json()['id']}"
    view = poll(api, location)
    assert view["status"] == "finished", view
    # One progress bar over the explanation search (5 steps) and the two stability searches.
    assert view["progress"]["done"] == view["progress"]["total"] == 5 + 2 * (service_stack.stability_steps + 1)

    probs, classes, x = direct_probs(service_models, model, data)
    result = view["result"]
    np.testing.assert_allclose([result["probs"][c] for c in classes], probs.numpy(), rtol=1e-5, atol=1e-6)
    roles = [t["role"] for t in result["targets"]]
    assert roles == ["predicted", "runner-up", "class"] if model == "tiny-rgb" else ["predicted", "class"]
    for t in result["targets"]:
        assert 0 < t["rms"] < 0.2  # the budget rho = 0.1 (overshoot k = 5, then pulled back)
        assert t["prob_before"] == pytest.approx(float(probs[t["class_index"]]), rel=1e-5)
        assert 0.0 <= t["prob_after"] <= 1.0

    # Every image: a valid PNG of the model's input size; input.png is what the model saw.
    names = set(view["images"])
    assert {"input.png", "gradcam.png", "gradcam_overlay.png"} <= names
    assert len(names) == 3 + 2 * len(result["targets"])
    for name, url in view["images"].items():
        resp = api.get(url)
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        (w, h), img_mode = png_size(resp.content)
        assert (w, h) == (size, size), name
    seen = np.asarray(Image.open(io.BytesIO(api.get(view["images"]["input.png"]).content)))
    np.testing.assert_array_equal(seen, to_uint8_image(x))
    assert all(
        t["image_url"] in view["images"].values() and t["difference_url"] in view["images"].values()
        for t in result["targets"]
    )


def test_twenty_concurrent_jobs_all_finish(api, make_image, poll):
    images = [make_image("PNG", "RGB", seed=i) for i in range(20)]

    def submit(i: int):
        if i % 2:
            return api.post("/v1/classify", **upload(images[i], model="tiny-rgb"))
        return api.post("/v1/explain", **upload(images[i], model="tiny-rgb", targets="predicted", steps=3))

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(submit, range(20)))
    assert all(r.status_code in (200, 202) for r in responses), [r.text for r in responses]
    views = [poll(api, r.json()["url"]) for r in responses]
    assert [v["status"] for v in views] == ["finished"] * 20
    assert len({v["id"] for v in views}) == 20


def _running(api, url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = api.get(url).json()
        if view["status"] == "running" and view["progress"] and view["progress"]["done"] > 0:
            return view
        assert view["status"] in ("queued", "running"), view
        time.sleep(0.05)
    raise AssertionError(f"job {url} did not start")


def test_cancel_a_running_job(api, make_image, poll, long_steps):
    resp = api.post(
        "/v1/explain", **upload(make_image("PNG", "RGB"), model="tiny-rgb", targets="all", steps=long_steps)
    )
    url = resp.headers["location"]
    try:
        running = _running(api, url)
        # One progress bar over both phases: the explanation search, then the stability searches.
        progress = running["progress"]
        assert progress["phase"] == "search" and 0 < progress["done"] < long_steps < progress["total"]
    finally:
        # Cancel even when an assertion failed, so the next test finds its worker free.
        resp = api.delete(url)
    assert resp.status_code in (200, 202), resp.text
    view = poll(api, url, timeout=30)
    assert view["status"] == "cancelled"
    assert view["error"]["code"] == "job_cancelled" and view["result"] is None
    assert api.get(f"{url}/images/input.png").status_code == 404
    # Cancelling again changes nothing.
    assert api.delete(url).json()["status"] == "cancelled"


def test_queue_depth_limit_and_cancelling_a_queued_job(service_stack, make_image, poll, long_steps):
    """Both workers busy: the next job waits (position 0), the one after is refused (429);
    the waiting one is cancelled at once."""

    with api_client(service_stack.model_copy(update={"max_queue_depth": 1})) as client:
        image = make_image("PNG", "RGB")
        # Two searches of different lengths: they never share a batch (worker.batching), so each
        # worker runs one of them and neither is free to take the next job.
        long_jobs = [
            client.post("/v1/explain", **upload(image, model="tiny-rgb", targets="all", steps=steps)).headers[
                "location"
            ]
            for steps in (long_steps, long_steps - 1)
        ]
        try:
            for url in long_jobs:
                _running(client, url)
            waiting = client.post("/v1/explain", **upload(image, model="tiny-rgb", steps=3))
            assert waiting.status_code == 202
            assert waiting.json()["status"] == "queued" and waiting.json()["queue_position"] == 0
            refused = client.post("/v1/explain", **upload(image, model="tiny-rgb", steps=3))
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "queue_full"
            cancelled = client.delete(waiting.headers["location"])
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        finally:
            for url in long_jobs:
                client.delete(url)
        for url in long_jobs:
            assert poll(client, url, timeout=30)["status"] == "cancelled"
        assert client.get(waiting.headers["location"]).json()["status"] == "cancelled"


def test_models_lists_what_the_workers_serve(api):
    body = api.get("/v1/models").json()
    assert body["default"] == "tiny-grey"  # the first by name when AEX_DEFAULT_MODEL is unset
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"tiny-grey", "tiny-rgb"}
    rgb = by_name["tiny-rgb"]
    assert rgb["classes"][3] == "cat" and rgb["input_size"] == 32 and rgb["in_channels"] == 3
    assert rgb["metrics"]["test_accuracy"] == 0.1 and rgb["workers"] == 2 and rgb["gradcam_layer"]
    assert len(rgb["weights_sha256"]) == 64
    one = api.get("/v1/models/tiny-rgb").json()
    assert one["gradcam_layer"] in one["layers"]


def test_gradcam_layer_can_be_chosen(api, make_image, poll):
    layers = api.get("/v1/models/tiny-rgb").json()["layers"]
    layer = next(n for n in layers if n.endswith("conv1") or n == "pipe.2")
    resp = api.post(
        "/v1/explain", **upload(make_image("PNG", "RGB"), model="tiny-rgb", targets="predicted", steps=2, layer=layer)
    )
    view = poll(api, resp.headers["location"])
    assert view["status"] == "finished" and view["result"]["gradcam"]["layer"] == layer


def test_health_readiness_metrics_and_docs(api, make_image):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}  # nothing beyond its status
    api.post("/v1/classify", **upload(make_image("PNG", "RGB"), model="tiny-rgb"))
    text = api.get("/metrics").text
    assert 'aex_http_requests_total{method="POST",route="/v1/classify",status="200"}' in text
    assert 'aex_queue_depth{queue="classify"}' in text and 'aex_workers{queue="explain"} 2.0' in text
    assert 'aex_jobs_total{kind="classify",outcome="finished"}' in text
    assert 'aex_job_duration_seconds_bucket{kind="classify",le="+Inf"}' in text
    assert "aex_redis_up 1.0" in text
    spec = api.get("/openapi.json").json()
    assert {
        "/v1/classify",
        "/v1/explain",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/images/{name}",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(spec["paths"])
    form = spec["paths"]["/v1/explain"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "model", "targets", "rho", "steps", "layer"} <= set(form["properties"])
    assert api.get("/docs").status_code == 200
