"""The tus routes: `/api/v1/uploads` (OPTIONS, POST) and `/api/v1/uploads/{id}` (OPTIONS,
HEAD, PATCH, DELETE, and GET for the upload's state and result as JSON).

Every method but OPTIONS needs a bearer token; every response under `/api/v1/uploads`
carries `Tus-Resumable`, errors included. `X-HTTP-Method-Override` on a POST names the method
to run (for clients that cannot send PATCH or DELETE); on other methods it is ignored.
"""

from __future__ import annotations

from typing import Final

from quart import Blueprint, Response, request
from werkzeug.exceptions import MethodNotAllowed

from ..http.body import request_body
from ..http.common import authenticate, authenticate_uploader, json_response, service
from ..upload.idempotency import parse_key
from .errors import InvalidTusHeader
from .protocol import (
    TUS_VERSION,
    check_version,
    effective_method,
    http_date,
    options_headers,
    parse_checksum,
    parse_concat,
    parse_defer_length,
    parse_metadata,
    parse_size,
)
from .service import Answer, TusService
from .state import Phase

BASE: Final = "/api/v1/uploads"
COLLECTION_METHODS: Final = ("OPTIONS", "POST")
RESOURCE_METHODS: Final = ("OPTIONS", "HEAD", "PATCH", "DELETE", "GET")
# Headers of the final answer that say where the stored file is.
FILE_ID_HEADER: Final = "Upload-File-Id"
ELEMENT_HEADER: Final = "Upload-Storage-Element-Id"

tus = Blueprint("tus", __name__)


def tus_service() -> TusService:
    return service().tus


def _is_tus_path(path: str) -> bool:
    return path == BASE or path.startswith(BASE + "/")


@tus.after_app_request
async def _tus_resumable(response: Response) -> Response:
    if _is_tus_path(request.path):
        response.headers["Tus-Resumable"] = TUS_VERSION
    return response


def _options() -> Response:
    return Response("", status=204, headers=options_headers(tus_service().max_size))


def _answer(answer: Answer, status: int) -> Response:
    upload = answer.upload
    headers = dict(answer.headers)
    headers["Upload-Offset"] = str(upload.offset)
    if answer.result is not None:
        headers[FILE_ID_HEADER] = answer.result["file_id"]
        headers[ELEMENT_HEADER] = answer.result["storage_element_id"]
    elif upload.phase is not Phase.DONE:
        headers["Upload-Expires"] = http_date(upload.expires_at)
    return Response("", status=status, headers=headers)


def _method(allowed: tuple[str, ...]) -> str:
    method = effective_method(request.method, request.headers.get("X-HTTP-Method-Override"))
    if method not in allowed:
        raise MethodNotAllowed(valid_methods=list(allowed))
    if method not in ("OPTIONS", "GET"):
        check_version(request.headers.get("Tus-Resumable"))
    return method


@tus.route(BASE, methods=list(COLLECTION_METHODS))
async def collection() -> Response:
    method = _method(COLLECTION_METHODS)
    if method == "OPTIONS":
        return _options()
    principal = await authenticate_uploader()
    headers = request.headers
    answer = await tus_service().create(
        principal,
        length=parse_size("Upload-Length", headers.get("Upload-Length")),
        defer_length=parse_defer_length(headers.get("Upload-Defer-Length")),
        metadata=parse_metadata(headers.get("Upload-Metadata")),
        concat=parse_concat(headers.get("Upload-Concat")),
        concat_header=headers.get("Upload-Concat"),
        content_type=headers.get("Content-Type"),
        content_length=request.content_length,
        checksum=parse_checksum(headers.get("Upload-Checksum")),
        body=request_body(),
        idempotency_key=parse_key(headers.get("Idempotency-Key")),
    )
    return _answer(answer, 201)


@tus.route(BASE + "/<upload_id>", methods=[*RESOURCE_METHODS, "POST"])
async def resource(upload_id: str) -> Response:
    method = _method(RESOURCE_METHODS)
    if method == "OPTIONS":
        return _options()
    tus_svc = tus_service()
    if method == "PATCH":
        principal = await authenticate_uploader()
        headers = request.headers
        offset = parse_size("Upload-Offset", headers.get("Upload-Offset"))
        if offset is None:
            raise InvalidTusHeader("PATCH needs an Upload-Offset header")
        answer = await tus_svc.patch(
            upload_id,
            principal,
            offset=offset,
            length=parse_size("Upload-Length", headers.get("Upload-Length")),
            checksum=parse_checksum(headers.get("Upload-Checksum")),
            content_type=headers.get("Content-Type"),
            content_length=request.content_length,
            body=request_body(),
        )
        return _answer(answer, 204)
    principal = await authenticate()
    if method == "HEAD":
        upload = await tus_svc.head(upload_id, principal)
        return Response("", status=200, headers=tus_svc.headers_of(upload))
    if method == "DELETE":
        await tus_svc.terminate(upload_id, principal)
        return Response("", status=204)
    upload = await tus_svc.load(upload_id, principal)
    view = upload.as_json()
    view["upload_metadata"] = {
        key: value.decode("utf-8", "replace") for key, value in upload.metadata.items()
    }
    progress = service().progress.get(upload.id)
    view["progress"] = None if progress is None else progress.as_json(service().progress.now())
    return json_response(view, headers={"Cache-Control": "no-store"})
