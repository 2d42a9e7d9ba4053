"""The Python client and `aex classify/explain --url` against the real stack: uvicorn on a
loopback port, a real Redis and two real worker processes serving tiny checkpoints, with
authentication on: the commands read the token from AEX_TOKEN or the token file, the client
takes ``token=``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from aex.cli import app
from aex.client import AexClient
from models.data.tensors import load_image_for_model
from models.errors import (
    BadParameterError,
    JobCancelledError,
    ServiceUnavailableError,
    UnknownJobError,
    UnknownModelError,
)
from models.store.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(autouse=True)
def token_file(api_token, tmp_path, monkeypatch) -> Path:
    """The admin token where `aex serve` would write it (AEX_TOKEN_FILE, mode 0600): the
    commands find it there by themselves, as after the README's first command."""
    from aex.credentials import write_token

    monkeypatch.delenv("AEX_TOKEN", raising=False)
    path = write_token(tmp_path / "config" / "aex" / "token", api_token)
    monkeypatch.setenv("AEX_TOKEN_FILE", str(path))
    return path


@pytest.fixture
def png(tmp_path, make_image) -> Path:
    path = tmp_path / "picture.png"
    path.write_bytes(make_image("PNG", "RGB", size=(60, 44), seed=7))
    return path


def model_probs(service_models: Path, name: str, image: Path) -> dict[str, float]:
    """What the checkpoint itself says about the image, in this process."""
    path = service_models / name / "model.safetensors"
    model, meta = load_checkpoint(path if path.exists() else service_models / f"{name}.safetensors")
    x = load_image_for_model(image.read_bytes(), meta.input_size, meta.in_channels)
    with torch.no_grad():
        probs = model(x[None]).softmax(1)[0]
    return dict(zip(meta.classes, probs.tolist()))


def test_aex_classify_prints_the_models_probabilities(live_api, service_models, png):
    res = runner.invoke(app, ["classify", str(png), "--url", live_api, "--model", "tiny-rgb", "--top-k", "3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    expected = model_probs(service_models, "tiny-rgb", png)
    assert list(out["probs"]) == list(expected)
    np.testing.assert_allclose([out["probs"][c] for c in expected], list(expected.values()), rtol=1e-5, atol=1e-6)
    assert [t["class_name"] for t in out["top"]] == sorted(expected, key=expected.get, reverse=True)[:3]
    assert out["predicted"]["class_name"] == max(expected, key=expected.get)
    assert len(out["job"]) == 32 and "stability" not in out

    res = runner.invoke(app, ["classify", str(png), "--url", live_api, "--model", "tiny-grey", "--stability"])
    assert res.exit_code == 0, res.output
    stability = json.loads(res.stdout)["stability"]
    assert stability["attack_rms"] > 0 and stability["btr_rms"] > 0
    assert 0 <= stability["attack_percentile"] <= 100 and stability["reference_n"] > 0
    assert "classify: finished" in res.stderr


def test_aex_explain_saves_every_image_and_the_result(live_api, png, tmp_path):
    out = tmp_path / "expl"
    res = runner.invoke(
        app,
        [
            "explain",
            str(png),
            "--url",
            live_api,
            "--out",
            str(out),
            "--model",
            "tiny-rgb",
            "--steps",
            "5",
            "-t",
            "predicted,runner-up",
            "-t",
            "cat",
        ],
    )
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    job = json.loads((out / "result.json").read_text())
    assert job["status"] == "finished" and job["id"] == printed["job"] and job["model"] == "tiny-rgb"
    targets = job["result"]["targets"]
    assert [t["role"] for t in targets] == ["predicted", "runner-up", "class"] and targets[2]["class_name"] == "cat"
    assert [t["class_name"] for t in printed["targets"]] == [t["class_name"] for t in targets]
    # Every PNG the service lists is saved, as a 32x32 image; nothing else but result.json.
    names = set(job["images"])
    assert {"input.png", "gradcam.png", "gradcam_overlay.png"} <= names and len(names) == 3 + 2 * 3
    assert {p.name for p in out.iterdir()} == names | {"result.json"}
    for name in names:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size == (32, 32), name
    for t in targets:
        assert (out / t["image"]).is_file() and (out / t["difference"]).is_file()
        assert 0 < t["rms"] < 0.2
    # The progress bar reached the end of the 5 search steps.
    assert "100%" in res.stderr and "explain: finished" in res.stderr


def structured_pixels(h: int = 60, w: int = 50) -> np.ndarray:
    """uint16 H x W with 12-bit values: gradients plus a bright disc (an X-ray-like scene)."""
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 4) ** 2) * 1500
    return (xx * 40 + yy * 20 + disc).clip(0, 4095).astype(np.uint16)


def test_aex_explain_of_a_dicom_file_saves_the_dicom_objects(live_api, dicom_file, tmp_path):
    import pydicom

    source = tmp_path / "scan.dcm"
    source.write_bytes(dicom_file(structured_pixels(), "MONOCHROME2", window=(1800.0, 3600.0)))
    src = pydicom.dcmread(source)
    out = tmp_path / "expl"
    res = runner.invoke(
        app,
        [
            "explain",
            str(source),
            "--url",
            live_api,
            "--out",
            str(out),
            "--model",
            "tiny-grey",
            "--steps",
            "5",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    job = json.loads((out / "result.json").read_text())
    # The overlay, each explanation and each difference (Secondary Captures), the Grad-CAM
    # Parametric Map, the PDF report and the SR.
    assert job["dicom"], job
    assert len(job["dicom"]) == 1 + 2 * len(job["result"]["targets"]) + 3
    assert {p.name for p in out.iterdir()} == set(job["images"]) | set(job["dicom"]) | {"result.json"}
    for name in job["dicom"]:
        ds = pydicom.dcmread(out / name)
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID, name
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
        if ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage:
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
            # The model's 28 x 28 pixels as blocks, at least 512 px, captioned on the image.
            assert max(ds.pixel_array.shape[:2]) >= 512 and ds.BurnedInAnnotation == "YES"
    pm = pydicom.dcmread(out / "gradcam_parametric_map.dcm")
    assert pm.pixel_array.shape == (60, 50)  # the source's own grid
    assert set(json.loads(res.stdout)["files"]) == set(job["images"]) | set(job["dicom"]) | {"result.json"}


def test_client_reports_progress_and_cancels(live_api, service_stack, api_token, png, long_steps):
    from models.perturb.stability import stability_evaluations

    seen: list[dict] = []
    with AexClient(live_api, poll_interval=0.05, token=api_token) as client:
        assert {m["name"] for m in client.models()["models"]} == {"tiny-grey", "tiny-rgb"}
        job = client.explain(png, model="tiny-grey", targets=["predicted"], steps=5, on_progress=seen.append)
        assert job["status"] == "finished" and seen[-1] is job
        assert seen[0]["status"] in ("queued", "running", "finished")
        done = [v["progress"]["done"] for v in seen if v.get("progress")]
        # One bar over the 5 explanation steps, then the two stability searches.
        total = 5 + stability_evaluations(service_stack.stability_steps)
        assert done == sorted(done) and job["progress"]["done"] == job["progress"]["total"] == total
        assert job["result"]["settings"]["steps"] == 5

        queued = client.explain(png, model="tiny-rgb", targets="all", steps=long_steps, wait=False)
        deadline = time.monotonic() + 60
        while (view := client.job(queued["id"]))["status"] != "running" or not view.get("progress"):
            assert time.monotonic() < deadline, view
            time.sleep(0.05)
        client.cancel(queued["id"])
        with pytest.raises(JobCancelledError) as info:
            client.wait(queued["id"], timeout=30)
        assert info.value.code == "job_cancelled"

        with pytest.raises(UnknownJobError, match="unknown job"):
            client.job("0" * 32)
        with pytest.raises(UnknownModelError) as info:
            client.classify(png, model="nope")
        assert info.value.code == "unknown_model" and info.value.http_status == 404
        with pytest.raises(BadParameterError, match="no such file"):
            client.classify(png.parent / "missing.png")


def test_errors_are_clear_messages_with_a_non_zero_exit(live_api, png, tmp_path):
    res = runner.invoke(app, ["explain", str(png), "--url", live_api, "--out", str(tmp_path / "a"), "--model", "nope"])
    assert res.exit_code == 2
    assert "error [unknown_model]: unknown model 'nope'; served: tiny-grey, tiny-rgb" in res.stderr
    assert not (tmp_path / "a").exists()

    res = runner.invoke(app, ["classify", str(png), "--url", live_api, "--model", "nope"])
    assert res.exit_code == 2 and "error [unknown_model]" in res.stderr

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    res = runner.invoke(app, ["classify", str(text), "--url", live_api])
    assert res.exit_code == 2 and "error [unsupported_media_type]" in res.stderr

    res = runner.invoke(app, ["explain", str(png), "--url", live_api, "--out", str(tmp_path / "b"), "--steps", "0"])
    assert res.exit_code == 2 and "error [bad_parameter]" in res.stderr and "steps" in res.stderr

    both = ["--url", live_api, "--checkpoint", str(tmp_path / "c.safetensors")]
    res = runner.invoke(app, ["explain", str(png), "--out", str(tmp_path / "c"), *both])
    assert res.exit_code == 2
    assert "give one of --checkpoint (run offline) and --url (use the service), not both" in res.stderr

    res = runner.invoke(app, ["explain", str(png), "--url", live_api, "--out", str(tmp_path / "d"), "--clamp"])
    assert res.exit_code == 2 and "--clamp" in res.stderr and "--checkpoint" in res.stderr

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    res = runner.invoke(app, ["classify", str(png), "--url", dead])
    assert res.exit_code == 2 and "error [service_unavailable]: cannot reach the service at" in res.stderr
    with pytest.raises(ServiceUnavailableError):
        AexClient(dead).models()


def test_the_client_never_imports_torch(live_api, png):
    """`aex classify --url` in a fresh process: answers, and torch is never imported."""
    code = textwrap.dedent(f"""
        import sys
        from aex.cli import app
        try:
            app(["classify", {str(png)!r}, "--url", {live_api!r}, "--model", "tiny-grey", "--no-progress"])
        except SystemExit as exc:
            assert not exc.code, exc.code
        heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision")))
        print("HEAVY", heavy, file=sys.stderr)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["predicted"]["class_name"] in ("normal", "pneumonia")
    assert "HEAVY []" in out.stderr


def test_without_a_valid_token_the_commands_say_how_to_get_one(live_api, png, tmp_path, monkeypatch):
    monkeypatch.setenv("AEX_TOKEN_FILE", str(tmp_path / "no-token-here"))
    res = runner.invoke(app, ["classify", str(png), "--url", live_api, "--model", "tiny-rgb"])
    assert res.exit_code == 2 and "error [unauthenticated]" in res.stderr and "aex serve" in res.stderr
    forged = "aex_" + "A" * 43
    res = runner.invoke(app, ["classify", str(png), "--url", live_api, "--token", forged])
    assert res.exit_code == 2 and "error [unauthenticated]: unknown or revoked API key" in res.stderr
    assert forged not in res.output


def test_aex_keys_and_audit_through_the_running_service(live_api, png):
    name = f"cli-{int(time.time() * 1000) % 10**9}"
    # The records from this test on: the session's other tests write more than a page of them
    # in a few minutes, so "--since 5m" could end before this test's (the oldest come first).
    since = datetime.now(UTC).replace(microsecond=0).isoformat()
    res = runner.invoke(app, ["keys", "create", name, "--scopes", "read", "--url", live_api])
    assert res.exit_code == 0, res.output
    key = json.loads(res.stdout)
    assert key["name"] == name and key["scopes"] == ["read"] and "shown this once" in res.stderr
    with AexClient(live_api, token=key["token"]) as reader:
        assert reader.models()["default"]
        with pytest.raises(Exception) as info:
            reader.classify(png, model="tiny-rgb")
        assert info.value.code == "forbidden" and info.value.http_status == 403
    res = runner.invoke(app, ["keys", "list", "--url", live_api])
    assert res.exit_code == 0 and name in res.stdout and key["token"] not in res.stdout
    res = runner.invoke(app, ["keys", "revoke", name, "--url", live_api])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["audit", "--since", since, "--url", live_api])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in res.stdout.splitlines()]
    mine = [(r["action"], r["status"]) for r in records if r["principal"] == f"key:{name}"]
    assert mine == [("GET /v1/models", 200), ("POST /v1/classify", 403)]
    assert ("POST /v1/keys", 201) in [(r["action"], r["status"]) for r in records]
    assert key["token"] not in res.stdout
