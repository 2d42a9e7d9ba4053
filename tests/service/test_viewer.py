"""The viewer page at `/`: served with its files, nothing loaded from outside, and driven in
headless Chromium (Debian's, through Playwright) against the real stack."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.require import missing

pytestmark = pytest.mark.e2e

STATIC = Path(__file__).resolve().parents[2] / "service" / "static"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NOTES = Path("/work/notes")


def test_the_page_and_its_files_are_served(api):
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'src="/static/app.js"' in page.text and 'href="/static/style.css"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        resp = api.get(f"/static/{name}")
        assert resp.status_code == 200 and kind in resp.headers["content-type"], name
    assert api.get("/static/nothing.js").status_code == 404
    # Nothing from outside: no absolute URL anywhere in the page's files.
    for path in STATIC.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", path.read_text()), path.name
    assert "/" not in api.get("/openapi.json").json()["paths"]  # the page is not part of the API


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium; scripts/test.sh does it as root)")
    from playwright import sync_api

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_viewer_explains_an_uploaded_image_in_chromium(browser, live_api, api_token, make_image, dicom_file, tmp_path):
    image = tmp_path / "picture.png"
    image.write_bytes(make_image("PNG", "RGB", size=(64, 48), seed=3))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    outside: list[str] = []
    page.on(
        "request", lambda req: None if req.url.startswith((live_api, "blob:", "data:")) else outside.append(req.url)
    )

    auth = {"Authorization": f"Bearer {api_token}"}
    page.goto(f"{live_api}/")
    # Authentication is on: the page asks for a token, which is pasted in its field.
    page.locator("#error").wait_for(state="visible")
    assert page.inner_text("#error").startswith("An access token is needed")
    assert all("401" in p for p in problems), problems  # the refused model list, nothing else
    problems.clear()
    page.fill("#token", api_token)
    page.press("#token", "Enter")
    page.wait_for_selector("#model option[value='tiny-rgb']", state="attached")
    page.select_option("#model", "tiny-rgb")
    assert "airplane, automobile, bird" in page.inner_text("#model-info")
    page.set_input_files("#file", str(image))
    assert "picture.png" in page.inner_text("#file-name")
    page.check("input[name='target'][value='predicted']")
    page.check("input[name='target'][value='runner-up']")
    page.fill("#steps", "5")
    page.fill("#rho", "0.1")
    page.click("#explain")

    page.wait_for_selector("#results:not([hidden])", timeout=120_000)
    page.wait_for_function(
        """() => {
        const imgs = [...document.querySelectorAll('#explanations img, #gradcam img')];
        return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
    }""",
        timeout=30_000,
    )

    # What the page shows is what the job says.
    job_url = page.evaluate("() => JSON.parse(document.getElementById('raw').textContent).url")
    job = httpx.get(f"{live_api}{job_url}", headers=auth).json()
    assert job["status"] == "finished" and job["progress"]["done"] == job["progress"]["total"]
    assert job["result"]["settings"]["steps"] == 5
    result = job["result"]
    sizes = page.eval_on_selector_all("#explanations img", "imgs => imgs.map((i) => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[32, 32]] * (2 * len(result["targets"])) and len(result["targets"]) == 2
    captions = page.inner_text("#explanations")
    for t in result["targets"]:
        assert t["class_name"] in captions
        assert f"{100 * t['prob_before']:.1f} %" in captions or f"{100 * t['prob_before']:.0f} %" in captions
    # Under the heat map and under each explanation's difference: that map's faithfulness (issue 13).
    faith = page.eval_on_selector_all("figcaption .faithfulness", "s => s.map((x) => x.textContent)")
    maps = [result["gradcam"]["faithfulness"], *(t["faithfulness"] for t in result["targets"])]
    assert len(faith) == len(maps) == 3
    for text, f in zip(faith, maps):
        for key, words in (("deletion_auc", "deletion AUC"), ("random_insertion_auc", "insertion AUC")):
            assert words in text and page.evaluate("(x) => Number(x).toPrecision(3)", f[key]) in text
        assert ("faster than a random order" in text) and (
            ("no faster" in text) == (f["deletion_auc"] >= f["random_deletion_auc"])
        )
    assert "Faithfulness" in page.inner_text("#gradcam")
    # Outputs are fetched with the token and shown from blob: URLs; data-src keeps their path.
    assert page.eval_on_selector_all("#gradcam img", "imgs => imgs.every((i) => i.src.startsWith('blob:'))")
    gradcam = page.eval_on_selector_all("#gradcam img", "imgs => imgs.map((i) => i.dataset.src)")
    assert gradcam == [job["images"][n] for n in ("input.png", "gradcam.png", "gradcam_overlay.png")]
    assert page.locator("#probs li").count() == len(result["probs"]) == 10
    assert result["predicted"]["class_name"] in page.inner_text("#headline")
    # Small model inputs are scaled up with visible pixels.
    box = page.locator("#explanations img").first.bounding_box()
    assert box["width"] >= 4 * 32
    assert page.eval_on_selector("#explanations img", "i => getComputedStyle(i).imageRendering") == "pixelated"
    assert page.eval_on_selector("#progress", "p => [p.value, p.max, p.hidden]") == [1, 1, False]
    assert page.inner_text("#status-text").startswith("Finished")
    if result.get("stability"):
        assert "stable" in page.inner_text("#stability-box") or "No comparison" in page.inner_text("#stability-box")
    assert page.is_hidden("#error")

    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if NOTES.is_dir():
        shutil.copy(shot, NOTES / "viewer.png")

    # An error is shown in words: a text file (dropped on the zone this time) is not an image.
    dropped = page.evaluate_handle("""() => {
        const dt = new DataTransfer();
        dt.items.add(new File(["this is not an image\\n"], "notes.txt", {type: "text/plain"}));
        return dt;
    }""")
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    assert "notes.txt" in page.inner_text("#file-name") and page.is_hidden("#preview")
    page.click("#explain")
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=30_000)
    assert error.inner_text().startswith("This file is not a supported image: ")
    assert page.get_attribute("#error", "role") == "alert"
    assert page.is_enabled("#explain")
    page.screenshot(path=str(tmp_path / "viewer-error.png"), full_page=True)

    # A DICOM file on the grey model (whose checkpoint records reference radii): its DICOM
    # objects are offered as downloads and the stability score is ranked against test images.
    yy, xx = np.mgrid[0:60, 0:50]
    scan = tmp_path / "scan.dcm"
    scan.write_bytes(dicom_file((xx * 40 + yy * 20).astype(np.uint16), "MONOCHROME2", window=(1800.0, 3600.0)))
    page.select_option("#model", "tiny-grey")
    page.set_input_files("#file", str(scan))
    assert "DICOM" in page.inner_text("#file-name")
    page.click("#explain")
    page.wait_for_selector("#dicom-box:not([hidden])", timeout=120_000)
    job_url = page.evaluate("() => JSON.parse(document.getElementById('raw').textContent).url")
    job = httpx.get(f"{live_api}{job_url}", headers=auth).json()
    links = page.eval_on_selector_all("#dicom a", "as => as.map((a) => new URL(a.href).pathname)")
    # The overlay, each explanation and its difference, the Grad-CAM Parametric Map and the SR.
    assert links == list(job["dicom"].values()) and len(links) == 1 + 2 * len(job["result"]["targets"]) + 3
    assert httpx.get(f"{live_api}{links[0]}", headers=auth).headers["content-type"] == "application/dicom"
    assert httpx.get(f"{live_api}{links[0]}").status_code == 401  # never without the token
    assert "DICOM input: DX, MONOCHROME2, 50×60" in page.inner_text("#headline")
    percentile = job["result"]["stability"]["attack_percentile"]
    assert f"more stable than {round(percentile)}% of test images" in page.inner_text("#stability-text")
    page.screenshot(path=str(tmp_path / "viewer-dicom.png"), full_page=True)
    if NOTES.is_dir():
        shutil.copy(tmp_path / "viewer-dicom.png", NOTES / "viewer-dicom.png")
    page.close()
    assert not outside, f"the page loaded from outside: {outside}"
    assert not [p for p in problems if "415" not in p], problems


def test_the_docs_page_runs_in_chromium_with_nothing_from_outside(browser, live_api):
    """/docs: Swagger UI from the service's own files under its strict CSP (a violation would be
    a console error), the schema drawn, the Authorize button for the bearer token."""
    page = browser.new_page()
    problems: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on(
        "request", lambda req: None if req.url.startswith((live_api, "blob:", "data:")) else outside.append(req.url)
    )
    page.goto(f"{live_api}/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert page.inner_text(".swagger-ui .info .title").startswith("aex")
    page.wait_for_selector(".opblock-summary-path[data-path='/v1/classify']", state="attached")
    assert page.locator("button.authorize").count() == 1
    page.close()
    assert not outside, f"/docs loaded from outside: {outside}"
    assert not problems, problems
