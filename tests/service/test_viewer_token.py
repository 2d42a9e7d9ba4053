"""The viewer's access token, in headless Chromium: pasted once, kept in sessionStorage for the
tab, sent as ``Authorization: Bearer`` to the API, and used to fetch outputs (an ``<img>``
cannot send it) — against a small guarded app that serves the real page."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

import pytest
from fastapi import FastAPI, Request, Response
from PIL import Image

from jobs.queues import connect
from service.app import install_error_handlers
from service.auth import ApiKeyStore, Authenticator, Principal, Scope, requires
from service.viewer import install_viewer
from tests.support.require import missing
from tests.support.servers import serve_app

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
DB = 12  # shared with tests/service/test_audit.py, which flushes it around each test


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def guarded_site(redis_server):
    conn = connect(f"{redis_server.url}?db={DB}")
    conn.flushdb()
    _, token = ApiKeyStore(conn).create("viewer", ["read"])
    seen: list[str | None] = []
    app = FastAPI()
    app.state.auth = Authenticator(True, ApiKeyStore(conn), None)
    install_error_handlers(app)  # the production handlers: the 401 challenge included

    @app.get("/v1/models")
    def models(request: Request, _p: Annotated[Principal, requires(Scope.READ)]) -> dict:
        seen.append(request.headers.get("authorization"))
        entry = {"name": "tiny", "arch": "preact_resnet", "classes": ["a", "b"], "num_classes": 2}
        return {"default": "tiny", "models": [{**entry, "input_size": 8, "in_channels": 3, "metrics": {}}]}

    @app.get("/v1/jobs/{job_id}/images/{name}")
    def image(job_id: str, name: str, _p: Annotated[Principal, requires(Scope.READ)]) -> Response:
        return Response(png(), media_type="image/png")

    install_viewer(app)
    with serve_app(app) as url:
        yield url, token, seen
    conn.flushdb()
    conn.close()


def test_the_token_is_kept_for_the_tab_and_sent_with_every_request(guarded_site):
    if not CHROMIUM.exists():
        missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium; scripts/test.sh does it as root)")
    from playwright import sync_api

    url, token, seen = guarded_site
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        page = browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(f"{url}/")
        page.locator("#error").wait_for(state="visible")
        assert page.inner_text("#error").startswith("An access token is needed")
        assert page.get_attribute("#token", "type") == "password"
        page.fill("#token", token)
        page.press("#token", "Enter")
        page.wait_for_selector("#model option[value='tiny']", state="attached")
        assert seen[-1] == f"Bearer {token}" and page.is_hidden("#error")
        assert page.input_value("#token") == ""  # not left in the field
        assert page.evaluate("() => sessionStorage.getItem('aex-token')") == token
        assert page.evaluate("() => localStorage.length") == 0 and page.context.cookies() == []
        # An output: fetched with the token, shown from a blob: URL.
        page.evaluate("() => document.body.append(figure('/v1/jobs/j/images/a.png', 'caption', 'alt'))")
        page.wait_for_function(
            "() => { const i = document.querySelector('body > figure img'); return i && i.complete && i.naturalWidth === 8; }"
        )
        src, data_src = page.eval_on_selector("body > figure img", "i => [i.src, i.dataset.src]")
        assert src.startswith("blob:") and data_src == "/v1/jobs/j/images/a.png"
        # The same tab keeps it across a reload; "Forget it" drops it.
        page.reload()
        page.wait_for_selector("#model option[value='tiny']", state="attached")
        assert seen[-1] == f"Bearer {token}"
        page.click("#token-forget")
        assert page.evaluate("() => sessionStorage.getItem('aex-token')") is None
        page.locator("#error").wait_for(state="visible")
        assert seen[-1] == f"Bearer {token}"  # the refused request reached no route
        # A new tab (a new session) starts without it.
        other = browser.new_page()
        other.goto(f"{url}/")
        assert other.evaluate("() => sessionStorage.getItem('aex-token')") is None
        browser.close()
    assert not problems, problems
