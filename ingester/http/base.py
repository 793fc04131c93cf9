"""What every QuartTrio app of this project shares: the bounded body (`.body`), request ids, and the
one place that turns exceptions into HTTP status, `error.code` and a JSON body."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Final

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .. import logs
from ..errors import IngesterError
from .body import DEFAULT_BUFFER_LIMIT, REQUEST_ID_RE, BodyLimits, BodyMiddleware
from .receive import ReceiveShare

log = logging.getLogger(__name__)

# werkzeug's HTTP exceptions (routing, method) mapped onto stable codes.
_HTTP_CODES: Final = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "CLIENT_TIMEOUT",
    413: "FILE_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def request_id() -> str:
    value = g.get("request_id")
    return value if isinstance(value, str) else "-"


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    body = {"error": {"code": code, "message": message, "request_id": request_id()}}
    return Response(
        json.dumps(body, ensure_ascii=False),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def make_app(
    name: str,
    *,
    buffer_limit: int = DEFAULT_BUFFER_LIMIT,
    access_log: bool = True,
    min_rate_bytes: int = 0,
    min_rate_window_s: float = 60.0,
    receive_share: ReceiveShare | None = None,
) -> QuartTrio:
    """A QuartTrio app with backpressure, request ids, JSON errors and an access log; with
    `min_rate_bytes`, request bodies slower than that per `min_rate_window_s` get 408."""

    app = QuartTrio(name)
    # Quart's public middleware hook: request bodies never reach Quart's unbounded buffer.
    limits = BodyLimits(
        buffer_limit=buffer_limit,
        receive_share=receive_share,
        min_rate_bytes=min_rate_bytes,
        min_rate_window_s=min_rate_window_s,
    )
    app.asgi_app = BodyMiddleware(app.asgi_app, limits)  # type: ignore[method-assign]
    # Quart's defaults assume small bodies and short responses; our handlers count bytes
    # themselves and every wait has its own cancel scope.
    app.config["MAX_CONTENT_LENGTH"] = None
    app.config["BODY_TIMEOUT"] = None
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.before_request
    async def _assign_request_id() -> None:
        supplied = request.headers.get("X-Request-ID", "")
        rid = supplied if REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
        g.request_id = rid
        g.started = time.perf_counter()
        logs.bind(request_id=rid, upload_id=None, user=None, storage_element_id=None)

    @app.after_request
    async def _echo_request_id(response: Response) -> Response:
        response.headers["X-Request-ID"] = request_id()
        if access_log:
            started = g.get("started")
            duration_ms = (time.perf_counter() - started) * 1000 if started else None
            log.info(
                "%s %s %d",
                request.method,
                request.path,
                response.status_code,
                extra={
                    "event": "http_request",
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "duration_ms": None if duration_ms is None else round(duration_ms, 2),
                },
            )
        return response

    @app.errorhandler(IngesterError)
    async def _ingester_error(error: IngesterError) -> Response:
        if error.logged:
            pass
        elif error.status >= 500:
            log.warning("%s: %s", error.code, error.message, extra={"error_code": error.code})
        else:
            log.info("%s: %s", error.code, error.message, extra={"error_code": error.code})
        headers = dict(error.headers)
        if error.status in (429, 503):
            headers.setdefault("Retry-After", str(app.config.get("RETRY_AFTER_S", 5)))
        return error_response(error.status, error.code, error.message, headers)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _HTTP_CODES.get(status, f"HTTP_{status}")
        headers: dict[str, str] = {}
        if status == 405 and hasattr(error, "valid_methods") and error.valid_methods:
            headers["Allow"] = ", ".join(error.valid_methods)
        return error_response(status, code, error.description or error.name, headers)

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error", exc_info=error, extra={"error_code": "INTERNAL_ERROR"})
        return error_response(500, "INTERNAL_ERROR", "internal error")

    return app
