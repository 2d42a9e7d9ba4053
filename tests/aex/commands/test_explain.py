"""``aex explain --checkpoint`` computes what the service's explain job computes: the same
result JSON (stability included) and the same pictures, on the same image."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from aex.cli import app

runner = CliRunner()

# What legitimately differs between two runs of the same computation: wall times, when and
# where it ran (the service's workers run one torch thread with deterministic kernels), and
# the URLs the service's job view adds to its result.
VOLATILE = {"seconds", "timings", "computed_at", "worker", "device", "determinism"}


def comparable(value: Any) -> Any:
    """``value`` without the volatile keys (at any depth) and without the view's *_url keys."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_url")}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def assert_same(a: Any, b: Any, where: str = "result") -> None:
    """Equal structure and text; numbers equal to float32 rounding."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("model", ["tiny-grey", "tiny-rgb"])
def test_offline_explain_prints_the_services_result(
    api, service_stack, service_models, make_image, poll, model, tmp_path
):
    image = tmp_path / "image.png"
    image.write_bytes(make_image("PNG", "RGB", size=(40, 36)))
    form = {"model": model, "targets": "predicted,runner-up", "steps": "7"}
    resp = api.post("/v1/explain", files={"image": ("image.png", image.read_bytes(), "image/png")}, data=form)
    assert resp.status_code in (200, 202), resp.text
    view = poll(api, f"/v1/jobs/{resp.json()['id']}")
    assert view["status"] == "finished", view
    service = view["result"]
    assert service["stability"]["settings"]["steps"] == service_stack.stability_steps

    checkpoint = next(p for p in service_models.rglob("*.safetensors") if model in str(p))
    # The workers compute with one thread; so does this process, for the same float sums.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = runner.invoke(
            app,
            [
                "explain",
                str(image),
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(tmp_path / "o"),
                "-t",
                "predicted,runner-up",
                "--steps",
                "7",
                "--no-progress",
                "--stability-steps",
                str(service_stack.stability_steps),
            ],
        )
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    offline = json.loads(res.stdout)
    assert offline == json.loads((tmp_path / "o" / "summary.json").read_text())
    assert offline["stability"] is not None and offline["provenance"]["cache_key"] == service["provenance"]["cache_key"]
    assert_same(comparable(service), comparable(offline))
    # And the same pictures, byte for byte where the numbers are the same.
    for name in ("input.png", "gradcam.png"):
        assert (tmp_path / "o" / name).read_bytes() == api.get(view["images"][name]).content, name
