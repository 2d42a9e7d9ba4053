"""The OpenAPI page at ``/docs``: Swagger UI served from the ``fastapi-swagger`` package's own files, nothing loaded from outside.

FastAPI's default page loads Swagger UI from a CDN. This one serves the script, the style sheet
and the icon that the ``fastapi-swagger`` package ships (Swagger UI 5, which reads the OpenAPI
3.1 schema FastAPI writes; the ``swagger-ui-bundle`` package's Swagger UI 4 cannot) under
``/docs/``, without that package's own routes, and answers the page with a strict
Content-Security-Policy: its one inline script (Swagger UI's start-up) is allowed by its
SHA-256 hash, nothing else inline runs, and everything comes from this origin. The routes of
the schema that need a token carry an HTTP bearer security scheme, so the page's "Authorize"
button takes one.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException

ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
SECURED_PREFIXES = ("/v1/", "/metrics")
BEARER = "bearer"


def docs_page(title: str) -> tuple[bytes, str]:
    """The page's HTML and its Content-Security-Policy (the inline script allowed by hash)."""
    html = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{title} API",
        swagger_js_url="/docs/swagger-ui-bundle.js",
        swagger_css_url="/docs/swagger-ui.css",
        swagger_favicon_url="/docs/favicon-32x32.png",
        # No badge from validator.swagger.io, no external link.
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": False},
    ).body
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in INLINE_SCRIPT.findall(html.decode())
    )
    csp = (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    )
    return html, csp


def secured_openapi(app: FastAPI) -> dict:
    """The app's OpenAPI schema with the bearer scheme on every route that needs a token."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # FastAPI's own (it caches it in app.openapi_schema)
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = {
            "type": "http",
            "scheme": "bearer",
            "description": "an aex API key (`aex_...`; `aex serve` wrote the first one to its token file) "
            "or an OIDC access token",
        }
        for path, operations in schema.get("paths", {}).items():
            if path.startswith(SECURED_PREFIXES):
                for operation in operations.values():
                    operation["security"] = [{BEARER: []}]
        app.openapi_schema = schema
    return app.openapi_schema


def install_docs(app: FastAPI) -> None:
    """``/docs`` and its files (the app is built with ``docs_url=None``), and the schema with
    its security scheme at ``/openapi.json``."""
    html, csp = docs_page(app.title)
    folder = resources.files("fastapi_swagger") / "resources"

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(
            html,
            headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )

    @app.get("/docs/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise HTTPException(404, "Not Found")
        return FileResponse(str(folder / name), media_type=ASSETS[name], headers={"X-Content-Type-Options": "nosniff"})

    app.openapi = lambda: secured_openapi(app)  # type: ignore[method-assign]
