"""What every feature's routes need: the service, JSON answers, and the caller.

Routes of every feature (`http/app.py`, `tus/routes.py`, `finalize/routes.py`) import these
from here, so no feature's routes import another's.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from quart import Response, current_app, request

from .. import logs
from ..auth.principal import Principal
from ..auth.verifier import bearer_from_header, require_upload
from ..errors import IngesterError, Unauthorized

if TYPE_CHECKING:
    from ..service import Service


def service() -> Service:
    return cast("Service", current_app.config["INGESTER_SERVICE"])


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        json.dumps(payload, ensure_ascii=False),
        status=status,
        content_type="application/json",
        headers=headers,
    )


async def authenticate() -> Principal:
    svc = service()
    try:
        if svc.verifier is None:
            raise Unauthorized("token verification is not configured on this ingester")
        token = await bearer_from_header(request.headers.get("Authorization"))
        principal = await svc.verifier.verify(token)
    except Unauthorized:
        svc.metrics.auth_failures.labels("401").inc()
        raise
    logs.bind(user=principal.username)
    return principal


async def authenticate_uploader() -> Principal:
    """The caller, who must be allowed to upload (403 otherwise, counted)."""
    principal = await authenticate()
    try:
        require_upload(principal)
    except IngesterError:
        service().metrics.auth_failures.labels("403").inc()
        raise
    return principal
