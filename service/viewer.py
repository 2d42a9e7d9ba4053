"""The viewer: a plain HTML + JavaScript page at ``/`` (no build step, nothing loaded from
outside), its files under ``/static/``. The page only calls the public API (/v1/...)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

# The page loads only its own files; images may also come from blob: (the local preview of
# the chosen file). Nothing from elsewhere can run or load.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)

viewer = APIRouter(include_in_schema=False)


@viewer.get("/")
def index() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


def install_viewer(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files at ``/static/``."""
    app.include_router(viewer)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
