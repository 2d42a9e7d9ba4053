"""aex's results for a chest DX, read back in the OHIF Viewer (the pinned @ohif/app build) over a real Orthanc, in headless Chromium: the source, the fused Grad-CAM map, the report's words.

A 1024 x 1024 DX is stored in Orthanc; the bundled pneumonia-robust checkpoint explains it
through the worker's own path (``worker.explaining.explain_result``: Parametric Map,
Secondary Captures, the Encapsulated PDF report, SR) and the objects it returns are stored by
STOW-RS (``pacs.store``), as they are. OHIF opens the study in its default mode, as a reader
would, and the test finds, in order: the X-ray in the viewport, the Parametric Map fused over it
(a colour map), the SR shown over the X-ray (no error, the finding's region drawn, its text
saying the class, its probability and "not for diagnostic use"), and the PDF report in the
viewport (the very bytes aex wrote, saying the same). Every derived series is labelled "not for
diagnostic use" in the study browser, and nothing is fetched from outside the loopback origin.

Screenshots of each view go to ``$AEX_TEST_ARTIFACTS/ohif/`` (``.ci/run``: test-artifacts/ohif/
in the checkout), else to the test's tmp_path; the page's console and the requests proxied to
Orthanc (``requests.txt``: when, status, size, path) are saved beside them.
Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

import io
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.support.dicom import xray
from tests.support.ohif import OhifServer, artifacts_dir, chromium, install_ohif, missing
from tests.support.orthanc import ORTHANC_PASSWORD, ORTHANC_USER, dicomweb_plugin

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "pneumonia-robust" / "model.safetensors"
LOAD_SECONDS = 90  # the viewer's first load (its bundles, the study's metadata)
VIEW_SECONDS = 60  # each view after a click
VIEWPORT = "[data-cy=viewport-pane]"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
NOT_FOR_DIAGNOSIS = "not for diagnostic use"
# What OHIF 3.13.2 writes where it cannot show something (lower case): its error boundary
# ("Something went wrong") and its messages for a display set it cannot load or render.
OHIF_ERRORS = ("something went wrong", "an error occurred", "failed to load", "not supported", "cannot be displayed")


@pytest.fixture(scope="module")
def pacs(request):
    """The session's Orthanc; its absence fails where the OHIF test is required (.ci/run)."""
    if shutil.which("Orthanc") is None or dicomweb_plugin() is None:
        missing("Orthanc or its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)")
    return request.getfixturevalue("orthanc")


def chest_dx() -> bytes:
    """A 1024 x 1024 DX (16 bits) shaped like a chest film: a bright body, two darker lung
    fields, a spine, with the Imager Pixel Spacing a detector writes (Type 1 in a DX)."""
    yy, xx = np.mgrid[0:1024, 0:1024] / 1023.0
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.52) ** 2 < 1
    lungs = sum(((xx - cx) / 0.17) ** 2 + ((yy - 0.45) / 0.3) ** 2 < 1 for cx in (0.3, 0.7))
    spine = (np.abs(xx - 0.5) < 0.04) & body
    rng = np.random.default_rng(18)
    image = 6000 + 30000 * body - 18000 * lungs + 12000 * spine + rng.normal(0, 600, (1024, 1024))
    ds = pydicom.dcmread(io.BytesIO(xray(np.clip(image, 0, 65535).astype(np.uint16))))
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", "PA", ["L", "F"]
    ds.WindowCenter, ds.WindowWidth = 24000, 44000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class Study:
    uid: str
    descriptions: dict[str, str]  # OHIF's modality label -> Series Description of each derived series
    predicted: dict
    report_pdf: bytes  # the PDF inside the Encapsulated PDF the worker wrote


@pytest.fixture(scope="module")
def study(pacs) -> Study:
    """The DX and aex's objects for it (the worker's DICOM outputs as it returns them), in Orthanc."""
    import torch

    from jobs.params import ExplainParameters
    from jobs.settings import Settings
    from pacs.store import store_results
    from worker.explaining import explain_result
    from worker.served import ServedModel

    dx = chest_dx()
    pacs.store(dx)
    served = ServedModel.load("pneumonia-robust", CHECKPOINT, torch.device("cpu"))
    parameters = ExplainParameters.build(
        targets=["predicted"], rho=0.1, steps=5, layer=served.gradcam_layer, stability_steps=5
    )
    out = explain_result(served, dx, "dicom", parameters, bound_check=False)
    objects = list(out.dicom_files.values())
    stored = store_results(Settings(pacs={"orthanc": pacs.endpoint()}).pacs, "orthanc", objects)
    assert (stored["stored"], stored["failed"]) == (len(objects), 0), stored
    descriptions, pdfs = {}, []
    for data in objects:
        ds = pydicom.dcmread(io.BytesIO(data))
        # OHIF labels a Parametric Map "PMAP" (its Modality is OT, as highdicom writes it).
        label = "PMAP" if ds.SOPClassUID == PARAMETRIC_MAP else str(ds.Modality)
        descriptions[label] = str(ds.SeriesDescription)
        if "EncapsulatedDocument" in ds:
            pdfs.append(bytes(ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength]))
    assert len(pdfs) == 1 and {"PMAP", "OT", "DOC", "SR"} <= set(descriptions), (len(pdfs), descriptions)
    source = pydicom.dcmread(io.BytesIO(dx), stop_before_pixels=True)
    return Study(str(source.StudyInstanceUID), descriptions, out.result.dump()["predicted"], pdfs[0])


@pytest.fixture(scope="module")
def ohif(pacs):
    server = OhifServer(install_ohif(), pacs.rest, (ORTHANC_USER, ORTHANC_PASSWORD))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


# --- what the viewport shows ------------------------------------------------------------------
def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def grey_image(rgb: np.ndarray) -> bool:
    """An X-ray: structure in grey (brightness varies), hardly any colour."""
    colour = (rgb.max(axis=2) - rgb.min(axis=2)) > 40
    return rgb.mean(axis=2).std() > 20 and colour.mean() < 0.03


def colour_map(rgb: np.ndarray) -> bool:
    """A map fused over the image: a fifth of the viewport or more in colour."""
    return ((rgb.max(axis=2) - rgb.min(axis=2)) > 40).mean() > 0.2


def pdf_page(rgb: np.ndarray) -> bool:
    """A PDF page in the browser's viewer: a large white area."""
    return (rgb.min(axis=2) > 235).mean() > 0.25


def shown(page, shows, seconds: float) -> bytes | None:
    """A screenshot of the first viewport once ``shows(pixels)`` holds for it, or None after ``seconds``."""
    viewport = page.locator(VIEWPORT).first
    deadline = time.monotonic() + seconds
    while True:
        png = viewport.screenshot()
        if shows(pixels(png)):
            return png
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def wait_for_view(page, name: str, shots: Path, shows, what: str, seconds: float = VIEW_SECONDS) -> None:
    """Screenshots of the viewport until ``shows(pixels)`` (or fail after ``seconds``, the last one
    kept); the one that shows it is saved as ``shots/name``."""
    png = shown(page, shows, seconds)
    if png is None:
        page.locator(VIEWPORT).first.screenshot(path=str(shots / f"failed-{name}"))
        page.screenshot(path=str(shots / f"failed-page-{name}"))
        raise AssertionError(f"the viewport did not show {what} within {seconds} s (see {shots})")
    (shots / name).write_bytes(png)
    page.screenshot(path=str(shots / f"page-{name}"))


def map_layer(page) -> dict | None:
    """The Parametric Map's layer in the viewport, as Cornerstone (``window.cornerstone``) holds
    it: whether its volume is loaded, its values' range and whether it is visible; None while no
    viewport has one."""
    return page.evaluate(
        """() => {
            const cs = window.cornerstone;
            for (const engine of cs?.getRenderingEngines() ?? []) {
                for (const viewport of engine.getViewports()) {
                    const layer = viewport.getActors().find(a => String(a.referencedId).startsWith('pmap.'));
                    const volume = layer && cs.cache.getVolume(layer.referencedId);
                    if (volume) {
                        return {loaded: Boolean(volume.loadStatus?.loaded), range: volume.voxelManager.getRange(),
                                visible: layer.actor.getVisibility()};
                    }
                }
            }
            return null;
        }"""
    )


def wait_for_fused_map(page, name: str, shots: Path) -> None:
    """The Parametric Map fused over the X-ray in colour, saved as ``shots/name``.

    OHIF 3.13.2 at times leaves the viewport as it last drew it, the X-ray alone, once the map's
    layer is ready: no draw is asked for after it (seen in 4 of 10 openings with both cores busy,
    never on an idle machine; the viewport then stays so until the reader's next gesture). The
    map's layer is then checked as Cornerstone holds it (loaded, values above zero, visible), the
    stale view kept as ``stale-<name>`` with a note, and the window resized, the gesture after
    which OHIF draws again; the map must then show. A map that is missing, empty or wrong fails
    either way: what is drawn is what aex wrote.
    """
    # Fusing builds a volume of both on the CPU (SwiftShader): a few seconds on a busy machine.
    png = shown(page, colour_map, VIEW_SECONDS / 2)
    if png is None:
        deadline = time.monotonic() + LOAD_SECONDS
        while (layer := map_layer(page)) is None or not layer["loaded"]:
            assert time.monotonic() < deadline, f"OHIF did not load the Parametric Map in {LOAD_SECONDS} s: {layer}"
            time.sleep(0.5)
        assert layer["visible"] and layer["range"][1] > 0, layer
        page.locator(VIEWPORT).first.screenshot(path=str(shots / f"stale-{name}"))
        note = f"OHIF showed the map's layer {layer} without drawing it; the window was resized to draw again"
        (shots / f"stale-{Path(name).stem}.txt").write_text(note + "\n")
        print(f"{name}: {note}")
        size = page.viewport_size
        page.set_viewport_size({"width": size["width"] - 100, "height": size["height"]})
    wait_for_view(page, name, shots, colour_map, "the Grad-CAM map in colour")


def viewport_text(page) -> str:
    """What the first viewport says: its HTML text (overlays, prompts, error boundaries) and the
    text Cornerstone draws in its SVG annotation layer (an SR's measurements and comments)."""
    viewport = page.locator(VIEWPORT).first
    drawn = viewport.evaluate("v => Array.from(v.querySelectorAll('svg text')).map(t => t.textContent)")
    return viewport.inner_text() + "\n" + "\n".join(drawn)


def ohif_error(text: str) -> str | None:
    """The first error OHIF writes in ``text`` (its error boundary, a display set it cannot load), if any."""
    return next((e for e in OHIF_ERRORS if e in text.lower()), None)


def wait_for_text(page, name: str, shots: Path, wanted: list[str], seconds: float = VIEW_SECONDS) -> str:
    """The viewport's text (``viewport_text``) once it holds every string of ``wanted``; fails at
    once on an OHIF error (the page's text), or after ``seconds``, screenshots saved as ``shots/name``."""
    deadline = time.monotonic() + seconds
    while True:
        text = viewport_text(page)
        error = ohif_error(page.locator("body").inner_text())
        if error is None and all(w in text for w in wanted):
            page.locator(VIEWPORT).first.screenshot(path=str(shots / name))
            page.screenshot(path=str(shots / f"page-{name}"))
            (shots / f"{Path(name).stem}.viewport-text.txt").write_text(text)
            return text
        if error is not None or time.monotonic() > deadline:
            page.screenshot(path=str(shots / f"failed-page-{name}"))
            (shots / f"failed-{Path(name).stem}.viewport-text.txt").write_text(text)
            missing_ = [w for w in wanted if w not in text]
            raise AssertionError(f"OHIF shows {error!r}; the viewport lacks {missing_} (see {shots}): {text!r}")
        time.sleep(0.5)


def drawn_regions(page) -> list[dict]:
    """The shapes Cornerstone draws in the first viewport's annotation layer (an SR's regions),
    each its tag and its box in page pixels (x, y, width, height), with the viewport's box."""
    return page.locator(VIEWPORT).first.evaluate(
        """v => {
            const own = v.getBoundingClientRect();
            return Array.from(v.querySelectorAll('svg.svg-layer polyline, svg.svg-layer path, svg.svg-layer rect'))
                .map(s => { const b = s.getBoundingClientRect();
                    return {tag: s.tagName, x: b.x, y: b.y, width: b.width, height: b.height,
                            viewport: [own.x, own.y, own.width, own.height]}; });
        }"""
    )


def thumbnail(page, modality: str):
    """The study browser's entry of the series with this modality."""
    label = page.locator("[data-cy=series-modality-label]", has_text=re.compile(rf"^\s*{modality}\s*$"))
    return page.locator("[data-cy^=study-browser-thumbnail]").filter(has=label)


def test_a_reader_sees_the_xray_the_fused_map_and_the_report_in_ohif(study, ohif, browser, tmp_path):
    shots = artifacts_dir(tmp_path)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    console: list[str] = []
    outside: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"page error: {exc}"))
    # Requests over the network other than to the one origin (the browser's own PDF viewer
    # loads chrome:// and chrome-extension:// pages, blob: and data: URLs stay in the page).
    page.on(
        "request",
        lambda r: (
            outside.append(r.url)
            if r.url.startswith(("http:", "https:", "ws:", "wss:")) and not r.url.startswith(ohif.url + "/")
            else None
        ),
    )
    try:
        page.goto(ohif.viewer(study.uid))
        # The study browser lists the source and every derived series, each derived one
        # labelled "not for diagnostic use" (its Series Description).
        series = {"DX", *study.descriptions}
        for modality in series:
            thumbnail(page, modality).first.wait_for(timeout=LOAD_SECONDS * 1000)
        labels = page.eval_on_selector_all(
            "[data-cy=series-description-label]", "labels => labels.map((l) => l.title || l.textContent)"
        )
        for modality, description in study.descriptions.items():
            assert description.endswith(NOT_FOR_DIAGNOSIS), (modality, description)
            assert thumbnail(page, modality).count() == 1, modality
            assert description in labels, (description, labels)

        # 1. The default layout shows the X-ray.
        wait_for_view(page, "1-source.png", shots, grey_image, "the X-ray", LOAD_SECONDS)

        # 2. The SR over the X-ray: no error, the finding's region (the Grad-CAM map's most
        # salient area) drawn, and beside it the class with its probability and the warning.
        thumbnail(page, "SR").dblclick()
        finding = f"{study.predicted['class_name']} (probability {100 * study.predicted['prob']:.1f} %)"
        text = wait_for_text(page, "2-structured-report.png", shots, [finding, NOT_FOR_DIAGNOSIS.upper()])
        assert "Predicted class: " + finding in text, text
        regions = [r for r in drawn_regions(page) if r["width"] > 4 and r["height"] > 4]
        (shots / "2-structured-report.regions.txt").write_text("\n".join(map(str, regions)))
        # A region, not the whole image: inside the viewport and smaller than it.
        _, _, width, height = regions[0]["viewport"] if regions else (0, 0, 0, 0)
        assert any(r["width"] < width and r["height"] < height for r in regions), regions

        # 3. The report (Encapsulated PDF) in the viewport: the browser's PDF viewer shows what
        # aex wrote, byte for byte.
        thumbnail(page, "DOC").dblclick()
        shown = page.wait_for_selector('object[type="application/pdf"][data^="blob:"]', timeout=VIEW_SECONDS * 1000)
        data = page.evaluate(
            "async (url) => Array.from(new Uint8Array(await (await fetch(url)).arrayBuffer()))",
            shown.get_attribute("data"),
        )
        assert bytes(data) == study.report_pdf
        text = study.report_pdf.decode("latin-1")
        assert f"Predicted class: {study.predicted['class_name']}, probability" in text
        assert f"{100 * study.predicted['prob']:.1f} %" in text and NOT_FOR_DIAGNOSIS.upper() in text
        wait_for_view(page, "3-report-pdf.png", shots, pdf_page, "the PDF page")
        assert ohif_error(page.locator("body").inner_text()) is None

        # 4. The Parametric Map, opened from the study browser, fused over the X-ray.
        thumbnail(page, "PMAP").dblclick()
        wait_for_fused_map(page, "4-parametric-map-fused.png", shots)

        assert outside == []
        failed = [(path, status) for path, status in ohif.proxied if status >= 400]
        assert failed == [], failed
    finally:
        page.screenshot(path=str(shots / "last-page.png"))
        (shots / "console.txt").write_text("\n".join(console))
        (shots / "requests.txt").write_text("\n".join(ohif.requests))
        page.close()
