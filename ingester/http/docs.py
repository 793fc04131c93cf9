"""The interactive API page at `/docs`: Swagger UI on the description at `/openapi.json`.

Off unless `INGESTER_DOCS_ENABLED=true` (then `404 NOT_FOUND`). The page and its scripts come
from this process only, out of the pinned `swagger-ui-bundle-v2` package (Swagger UI 5, the
first major version that renders OpenAPI 3.1; Apache-2.0), so it works on a closed network:
no CDN, and the online validator badge is switched off. Every URL in the page is relative,
so it also works behind a reverse proxy that adds a path prefix.
"""

from __future__ import annotations

import functools
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

import trio
from quart import Blueprint, Response, current_app

from ..errors import NotFound

if TYPE_CHECKING:
    from ..service import Service

docs = Blueprint("docs", __name__)

# The bundle's files the page loads, with their media types: nothing else is served.
ASSETS: Final = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui-standalone-preset.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
INITIALIZER: Final = "swagger-initializer.js"

_PAGE: Final = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>artStore Ingester API</title>
    <link rel="stylesheet" href="docs/swagger-ui.css">
    <link rel="icon" type="image/png" href="docs/favicon-32x32.png" sizes="32x32">
    <link rel="icon" type="image/png" href="docs/favicon-16x16.png" sizes="16x16">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="docs/swagger-ui-bundle.js" charset="utf-8"></script>
    <script src="docs/swagger-ui-standalone-preset.js" charset="utf-8"></script>
    <script src="docs/swagger-initializer.js" charset="utf-8"></script>
  </body>
</html>
"""

# Relative to the page (/docs), so /openapi.json, and the same under a proxy's prefix.
_INITIALIZER_JS: Final = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout",
  });
};
"""

# Swagger UI styles its elements inline; everything else comes from this origin.
_CSP: Final = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "frame-ancestors 'none'"
)
_ASSET_CACHE: Final = "public, max-age=3600"


def bundle_dir() -> Path:
    """Where the pinned package keeps Swagger UI's files."""
    bundle = import_module("swagger_ui_bundle")
    return Path(str(bundle.swagger_ui_path))


@functools.cache
def _read_asset(name: str) -> bytes:
    return (bundle_dir() / name).read_bytes()


def _require_enabled() -> None:
    service = cast("Service", current_app.config["INGESTER_SERVICE"])
    if not service.settings.docs_enabled:
        raise NotFound("the API page is off (INGESTER_DOCS_ENABLED); see /openapi.json")


@docs.get("/docs")
async def docs_page() -> Response:
    _require_enabled()
    return Response(
        _PAGE,
        content_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"},
    )


@docs.get("/docs/<asset>")
async def docs_asset(asset: str) -> Response:
    _require_enabled()
    if asset == INITIALIZER:
        body = _INITIALIZER_JS.encode()
        content_type = "text/javascript; charset=utf-8"
    elif asset in ASSETS:
        # Read once (1.5 MB at most) in a thread, then served from memory.
        body = await trio.to_thread.run_sync(_read_asset, asset)
        content_type = ASSETS[asset]
    else:
        raise NotFound(f"no asset {asset!r} in the API page")
    return Response(body, content_type=content_type, headers={"Cache-Control": _ASSET_CACHE})
