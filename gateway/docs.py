"""`/docs`: Swagger UI over `/openapi.json`, served from the files the `swagger-ui-py` package
installs (Swagger UI 5, Apache-2.0, its LICENSE beside them). Nothing comes from a CDN: the
service often runs where there is no internet, and the page's Content-Security-Policy lets the
browser load nothing from anywhere else.
"""

from __future__ import annotations

import base64
import hashlib
import html
from importlib.util import find_spec
from pathlib import Path

from aiohttp import web

ASSETS = "/docs/static"

# The page's one inline script; the CSP names its hash, so no other inline script runs.
_INIT = (
    "window.onload = function () {"
    " window.ui = SwaggerUIBundle({url: '/openapi.json', dom_id: '#swagger-ui',"
    " deepLinking: true, persistAuthorization: true, tryItOutEnabled: false,"
    " presets: [SwaggerUIBundle.presets.apis], layout: 'BaseLayout'}); };"
)
_INIT_HASH = base64.b64encode(hashlib.sha256(_INIT.encode()).digest()).decode()
# Swagger UI sets inline styles and data: images itself; everything else is this origin.
CSP = (
    "default-src 'self'; "
    f"script-src 'self' 'sha256-{_INIT_HASH}'; "
    "style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; "
    "connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def assets_dir() -> Path:
    """Where swagger-ui-py installed Swagger UI's files (found without importing it)."""
    spec = find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed: reinstall queue-server")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def add_assets(app: web.Application) -> None:
    """Serve the Swagger UI files under ASSETS (read-only, no directory listing)."""
    app.router.add_static(ASSETS, assets_dir(), follow_symlinks=False, show_index=False)


def page(title: str) -> web.Response:
    """The /docs page: Swagger UI's stylesheet and bundle, and the line that starts it."""
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)} API</title>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f'<link rel=stylesheet href="{ASSETS}/swagger-ui.css">'
        f'<link rel=icon type=image/png href="{ASSETS}/favicon-32x32.png">'
        "</head><body><div id=swagger-ui></div>"
        f'<script src="{ASSETS}/swagger-ui-bundle.js"></script>'
        f"<script>{_INIT}</script></body></html>"
    )
    response = web.Response(text=body, content_type="text/html")
    response.headers["Content-Security-Policy"] = CSP
    return response
