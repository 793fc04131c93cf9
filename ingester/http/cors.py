"""CORS for browser clients: only the origins configured in `INGESTER_CORS_ORIGINS`.

No origin is allowed unless configured, and `*` only when `*` itself is configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from quart import Response, request
from quart_trio import QuartTrio

ALLOWED_METHODS: Final = "GET, POST, HEAD, PATCH, DELETE, OPTIONS"
ALLOWED_HEADERS: Final = (
    "Authorization, Content-Type, Content-Digest, Idempotency-Key, X-Request-ID, X-Upload-ID, "
    "Tus-Resumable, Upload-Length, Upload-Offset, Upload-Metadata, Upload-Checksum, "
    "Upload-Defer-Length, Upload-Concat, X-HTTP-Method-Override"
)
EXPOSED_HEADERS: Final = (
    "X-Request-ID, Location, Retry-After, Tus-Resumable, Upload-Offset, Upload-Length, "
    "Upload-Expires, Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm, "
    "Upload-Metadata, Upload-Defer-Length, Upload-Concat, Upload-File-Id, "
    "Upload-Storage-Element-Id, Idempotent-Replayed"
)
# Browsers cache a preflight answer this long (seconds).
PREFLIGHT_MAX_AGE: Final = "600"


def install_cors(app: QuartTrio, origins: Sequence[str]) -> None:
    allowed = frozenset(origins)
    if not allowed:
        return
    wildcard = "*" in allowed

    def allow(origin: str | None) -> str | None:
        if origin is None:
            return None
        if origin in allowed:
            return origin
        return "*" if wildcard else None

    @app.before_request
    async def _preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        response = Response("", status=204)
        origin = allow(request.headers.get("Origin"))
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        response.headers["Vary"] = "Origin"
        return response

    @app.after_request
    async def _headers(response: Response) -> Response:
        origin = allow(request.headers.get("Origin"))
        if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            response.headers.add("Vary", "Origin")
        return response
