"""OpenAPI 3.1 description of the ingester's HTTP API, served at /openapi.json.

Written by hand and checked against the app: `tests/integration/test_openapi.py` compares it
with the routes (every route described with its methods, every described path served), and
`tests/integration/test_schemathesis.py` fuzzes a live ingester with it (no 5xx, every status,
body and header as described here). The `error.code` values listed per status are read from
`ingester.errors`, so they follow the code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from ..errors import IngesterError
from .docs import ASSETS, INITIALIZER

# What the error handlers add beside the project's errors (werkzeug's routing errors and the
# catch-all): `ingester.http.base`.
_EXTRA_CODES: Final = {400: ["BAD_REQUEST"], 404: ["NOT_FOUND"], 500: ["INTERNAL_ERROR"]}
_REQUEST_ID_PATTERN: Final = r"^[A-Za-z0-9._:\-]{1,128}$"
# Control characters other than tab, LF and CR: refused in `description`.
_NO_CONTROL_PATTERN: Final = r"^[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]*$"


def _subclasses(cls: type[IngesterError]) -> Iterator[type[IngesterError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def error_codes(status: int) -> list[str]:
    """Every `error.code` the service answers with this status."""
    classes: list[type[IngesterError]] = [IngesterError, *_subclasses(IngesterError)]
    # The project's tree only (`ingester.errors`): whatever else is imported (the reference
    # Storage Element's errors in a test process) must not change the description.
    # Resumable uploads and finalization list their own codes (`_tus_paths`, `_finalize_paths`).
    codes = {
        cls.code for cls in classes if cls.status == status and cls.__module__ == "ingester.errors"
    }
    codes.update(_EXTRA_CODES.get(status, []))
    return sorted(codes)


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _headers(names: tuple[str, ...] = ()) -> dict[str, Any]:
    """X-Request-ID (on every answer) and the named headers, from `components.headers`."""
    return {name: _ref("headers", name) for name in ("X-Request-ID", *names)}


def _error(
    description: str, status: int, *, codes: list[str] | None = None, headers: tuple[str, ...] = ()
) -> dict[str, Any]:
    listed = codes if codes is not None else error_codes(status)
    return {
        "description": f"{description}. `error.code`: " + ", ".join(f"`{c}`" for c in listed),
        "headers": _headers(headers),
        "content": {"application/json": {"schema": _ref("schemas", "Error")}},
    }


def _json(
    description: str, schema: dict[str, Any], *, headers: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "description": description,
        "headers": _headers(headers),
        "content": {"application/json": {"schema": schema}},
    }


def _internal_error() -> dict[str, Any]:
    return _error("An unexpected error (logged with the request id)", 500, codes=["INTERNAL_ERROR"])


def _operation(
    operation_id: str, summary: str, tag: str, responses: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    parameters = [_ref("parameters", "X-Request-ID"), *extra.pop("parameters", [])]
    return {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "parameters": parameters,
        **extra,
        "responses": responses | {"500": _internal_error()},
    }


def _upload_result() -> dict[str, Any]:
    return {
        "type": "object",
        "required": [
            "file_id", "upload_id", "original_filename", "storage_filename", "content_type",
            "file_size", "stored_size", "compressed", "compression_algorithm",
            "compression_ratio", "compression_decision", "checksum", "uploaded_at",
            "retention_policy", "ttl_days", "ttl_expires_at", "storage_element_id",
            "storage_element_url",
        ],
        "properties": {
            "file_id": {"type": "string", "format": "uuid"},
            "upload_id": {"type": "string", "format": "uuid"},
            "original_filename": {"type": "string", "description": "last path component, control and bidi characters removed, NFC, at most 255 UTF-8 bytes"},
            "storage_filename": {"type": ["string", "null"], "description": "the element's own name for the stored file; null when it does not say (artStore's element)"},
            "content_type": {"type": "string"},
            "file_size": {"type": "integer", "minimum": 0, "description": "bytes received (the original)"},
            "stored_size": {"type": "integer", "minimum": 0, "description": "bytes on the Storage Element"},
            "compressed": {"type": "boolean"},
            "compression_algorithm": {"enum": ["gzip", "brotli", None]},
            "compression_ratio": {"type": "number", "description": "file_size / stored_size; 1.0 when not compressed"},
            "compression_decision": {
                "enum": ["requested", "not_requested", "below_min_size", "already_compressed_type", "already_compressed_content", "no_gain", "element_policy"],
                "description": "why the file was or was not compressed",
            },
            "checksum": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "sha256 hex of the original bytes"},
            "uploaded_at": {"type": "string", "format": "date-time"},
            "retention_policy": {"enum": ["temporary", "permanent"]},
            "ttl_days": {"type": ["integer", "null"], "minimum": 1, "maximum": 365},
            "ttl_expires_at": {"type": ["string", "null"], "format": "date-time"},
            "storage_element_id": {"type": "string"},
            "storage_element_url": {"type": "string"},
        },
    }  # fmt: skip


def _upload_progress() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["upload_id", "state", "bytes_received", "bytes_sent", "percent", "error_code", "result"],
        "properties": {
            "upload_id": {"type": "string", "format": "uuid"},
            "state": {"enum": ["receiving", "storing", "done", "failed", "cancelled"]},
            "filename": {"type": ["string", "null"]},
            "bytes_received": {"type": "integer", "minimum": 0},
            "bytes_sent": {"type": "integer", "minimum": 0},
            "expected_bytes": {"type": ["integer", "null"], "description": "the request's Content-Length, when it had one"},
            "percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100, "description": "against expected_bytes; null without it until done"},
            "bytes_per_second": {"type": "integer", "minimum": 0},
            "storage_element_id": {"type": ["string", "null"]},
            "elapsed_s": {"type": "number", "minimum": 0},
            "error_code": {"type": ["string", "null"], "description": "the failed upload's `error.code`"},
            "result": {"oneOf": [_ref("schemas", "UploadResult"), {"type": "null"}], "description": "the 201 answer, once done"},
        },
    }  # fmt: skip


def _readiness() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["status", "reasons", "writable_storage_elements", "storage_elements"],
        "properties": {
            "status": {"enum": ["ready", "not_ready", "degraded"]},
            "reasons": {"type": "array", "items": {"type": "string"}, "description": "why not ready: starting, shutting down, no writable Storage Element answers"},
            "degraded": {"type": "array", "items": {"type": "string"}},
            "writable_storage_elements": {"type": "array", "items": {"type": "string"}},
            "storage_elements": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "mode", "ready"],
                    "properties": {
                        "id": {"type": "string"},
                        "mode": {"enum": ["edit", "rw", "ro", "ar"]},
                        "status": {"type": "string"},
                        "ready": {"type": "boolean"},
                        "last_error": {"type": ["string", "null"]},
                        "breaker": {"enum": ["closed", "half_open", "open"]},
                    },
                },
            },
            "registry_source": {"enum": ["static", "redis", "redis-stale"]},
            "registry": {"type": "object"},
            "uploads_in_flight": {"type": "integer", "minimum": 0},
        },
    }  # fmt: skip


def _upload_form() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["file"],
        "description": (
            "Fields may come before or after `file`; send `retention_policy`, `compress` and "
            "`compression_algorithm` before it for a single pass with no spool. Values are "
            "stripped, an empty one counts as not sent, enumerations and booleans match "
            "case-insensitively, unknown fields are ignored."
        ),
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "the file; its part's filename is kept (cleaned)"},
            "description": {"type": "string", "maxLength": 1000, "pattern": _NO_CONTROL_PATTERN, "description": "no control characters other than tab and line breaks"},
            "retention_policy": {"type": "string", "enum": ["temporary", "permanent"], "default": "temporary", "description": "temporary: an `edit` Storage Element; permanent: an `rw` one"},
            "ttl_days": {"type": "integer", "minimum": 1, "maximum": 365, "default": 30, "description": "temporary files only (an error with `permanent`)"},
            "compress": {"type": "boolean", "default": False, "description": "also 1/0, yes/no, on/off; skipped for small or already-compressed files"},
            "compression_algorithm": {"type": "string", "enum": ["gzip", "brotli"], "description": "with `compress` (default brotli); ignored without it but still checked"},
            "metadata": {
                "type": "string",
                "maxLength": 65536,
                "contentMediaType": "application/json",
                "contentSchema": {"type": "object"},
                "description": "a JSON object as a string: at most 64 KiB, 8 levels deep, no `_ingester` key",
            },
            "storage_mode": {"type": "string", "enum": ["edit", "rw"], "deprecated": True, "description": "edit = temporary, rw = permanent; `ro` and `ar` are refused; must agree with `retention_policy`"},
        },
    }  # fmt: skip


def _info() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["service", "version", "endpoints"],
        "properties": {
            "service": {"const": "artstore-ingester"},
            "version": {"type": "string"},
            "storage_elements": {"type": "integer", "minimum": 0},
            "registry_source": {"type": "string"},
            "max_file_size": {"type": "integer", "minimum": 1},
            "endpoints": {"type": "object"},
        },
    }


def _components() -> dict[str, Any]:
    return {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": (
                    "RS256 access token (artStore or Keycloak claims). Uploading needs role "
                    "`user` or above, or scope `files:write`; refresh tokens are refused."
                ),
            }
        },
        "parameters": {
            "X-Request-ID": {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "Your id for this request, echoed back and logged; one is made when absent or not 1-128 of `A-Za-z0-9._:-`",
                "schema": {"type": "string"},
            },
        },
        "headers": {
            "X-Request-ID": {"description": "the caller's request id, or a new one", "required": True, "schema": {"type": "string", "pattern": _REQUEST_ID_PATTERN}},
            "Retry-After": {"description": "seconds to wait before trying again", "required": True, "schema": {"type": "integer", "minimum": 0}},
            "WWW-Authenticate": {"description": "`Bearer realm=\"artstore\", error=..., error_description=...`: which check failed", "required": True, "schema": {"type": "string", "pattern": "^Bearer "}},
            "Location": {"description": "the stored file", "required": True, "schema": {"type": "string"}},
            "Idempotent-Replayed": {"description": "`true`: the first answer for this Idempotency-Key, replayed (nothing stored again)", "required": False, "schema": {"const": "true"}},
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message", "request_id"],
                        "properties": {
                            "code": {"type": "string", "pattern": "^[A-Z0-9_]+$", "description": "stable, one per cause"},
                            "message": {"type": "string", "description": "for people; names the field at fault"},
                            "request_id": {"type": "string", "description": "as in the X-Request-ID header"},
                        },
                    }
                },
            },
            "UploadResult": _upload_result(),
            "UploadProgress": _upload_progress(),
            "Readiness": _readiness(),
            "Info": _info(),
        },
    }  # fmt: skip


def _upload_operation() -> dict[str, Any]:
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    return _operation(
        "uploadFile",
        "Upload one file, streamed (hashed, maybe compressed) to a Storage Element",
        "uploads",
        {
            "201": _json("Stored (or, for a repeated Idempotency-Key with the same file, the first answer again)", _ref("schemas", "UploadResult"), headers=("Location", "Idempotent-Replayed")),
            "400": _error("A field, the multipart body or a header is wrong (the message names it)", 400),
            "401": _error("No token, or an invalid one", 401, headers=("WWW-Authenticate",)),
            "403": _error("The token's role or scope cannot upload", 403),
            "408": _error("The client sent nothing for the idle timeout, sent the body below the minimum rate, or the upload deadline passed", 408),
            "413": _error("The declared or counted size is over the maximum (the connection then closes)", 413),
            "409": _error("An upload with this Idempotency-Key is still running (Retry-After: when its claim runs out), or this caller's X-Upload-ID is in use", 409, headers=("Retry-After",)),
            "415": _error("The body is not multipart/form-data", 415),
            "422": _error("This Idempotency-Key was used for another file (sha256 or file name)", 422),
            "429": _error("This user has too many uploads in flight", 429, headers=("Retry-After",)),
            "502": _error("A Storage Element failed or refused us, or two reported the same bytes other than those we hashed (nothing is left on them)", 502),
            "503": _error("Too many uploads, shutting down, or no Storage Element left", 503, headers=("Retry-After",)),
            "504": _error("The Storage Element stopped accepting data (failover off)", 504),
            "507": _error("No Storage Element of the right mode has room", 507),
        },
        description=(
            "`multipart/form-data` with a `file` part. Nothing is committed on a Storage "
            "Element until the whole form was read and checked; any failure leaves nothing."
        ),
        security=bearer,
        parameters=[
            {"name": "Content-Digest", "in": "header", "required": False, "description": "`sha-256=:<base64>:` (RFC 9530) of the file's bytes, checked (`DIGEST_MISMATCH`)", "schema": {"type": "string"}},
            {"name": "Idempotency-Key", "in": "header", "required": False, "description": "a retry with the same key (same user, within INGESTER_IDEMPOTENCY_TTL_S) and the same file gets the first 201 again and stores nothing twice", "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"}},
            {"name": "X-Upload-ID", "in": "header", "required": False, "description": "choose the upload id, to poll its progress while it runs", "schema": {"type": "string", "format": "uuid"}},
        ],
        requestBody={
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": _ref("schemas", "UploadForm"),
                    "encoding": {"file": {"contentType": "application/octet-stream"}},
                }
            },
        },
    )  # fmt: skip


def _probe(operation_id: str, summary: str, kind: str) -> dict[str, Any]:
    if kind == "live":
        responses = {
            "200": _json(
                "Alive",
                {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"const": "alive"}},
                },
            )
        }
    else:
        responses = {
            "200": _json(
                "Ready: a writable Storage Element answers (status `degraded` while Redis is unreachable)",
                _ref("schemas", "Readiness"),
            ),
            "503": _json(
                "Not ready: starting, shutting down, or no writable Storage Element answers",
                _ref("schemas", "Readiness"),
                headers=("Retry-After",),
            ),
        }
    return {"get": _operation(operation_id, summary, "operations", responses)}  # fmt: skip


def _tus_header(
    name: str, description: str, *, required: bool = False, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _tus_headers(*names: str) -> dict[str, Any]:
    """Response headers of the tus routes: `Tus-Resumable` on every one, plus `names`."""
    described = {
        "Tus-Resumable": "`1.0.0`",
        "Tus-Version": "`1.0.0`",
        "Tus-Extension": "creation, creation-with-upload, creation-defer-length, termination, checksum, expiration, concatenation",
        "Tus-Max-Size": "largest upload in bytes",
        "Tus-Checksum-Algorithm": "`sha1,md5,sha256`",
        "Location": "the new upload's URL (`/api/v1/uploads/{id}`)",
        "Upload-Offset": "bytes stored so far",
        "Upload-Length": "the upload's length, once known",
        "Upload-Expires": "when an unfinished upload is removed (RFC 9110 date)",
        "Upload-File-Id": "the stored file's id, once the last byte is stored",
        "Upload-Storage-Element-Id": "the Storage Element holding it",
        "Cache-Control": "`no-store`",
        "Idempotent-Replayed": "`true`: a creation repeated with its Idempotency-Key; the upload the first one made",
    }
    out = _headers()
    for name in ("Tus-Resumable", *names):
        out[name] = {
            "description": described[name],
            "required": name == "Tus-Resumable",
            "schema": {"type": "string"},
        }
    return out


def _tus_error(description: str, status: int, codes: list[str]) -> dict[str, Any]:
    error = _error(
        description, status, codes=codes, headers=("Retry-After",) if status in (429, 503) else ()
    )
    error["headers"]["Tus-Resumable"] = {"required": True, "schema": {"type": "string"}}
    return error


def _tus_paths() -> dict[str, Any]:
    """Resumable uploads: the tus 1.0.0 protocol (tus.io), so stock clients work unchanged."""
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    version = _tus_header("Tus-Resumable", "`1.0.0` (else `412`)", required=True)
    override = _tus_header(
        "X-HTTP-Method-Override",
        "PATCH, DELETE, HEAD, GET or OPTIONS sent as POST (ignored on any other method)",
    )
    upload_id = {"name": "upload_id", "in": "path", "required": True, "schema": {"type": "string"}}
    unauthorized = _tus_error("No token, or an invalid one", 401, ["UNAUTHORIZED"])
    unauthorized["headers"]["WWW-Authenticate"] = _ref("headers", "WWW-Authenticate")
    not_found = _tus_error("No such upload, or another user's", 404, ["UPLOAD_NOT_FOUND"])
    capabilities = {
        "204": {
            "description": "Capabilities",
            "headers": _tus_headers(
                "Tus-Version", "Tus-Extension", "Tus-Max-Size", "Tus-Checksum-Algorithm"
            ),
        }
    }
    body = {
        "required": False,
        "content": {
            "application/offset+octet-stream": {"schema": {"type": "string", "format": "binary"}}
        },
    }
    collection = {
        "options": _operation(
            "tusOptions", "tus capabilities (no token)", "resumable uploads", capabilities
        ),
        "post": _operation(
            "tusCreate",
            "Create a resumable upload (creation, creation-with-upload, creation-defer-length, concatenation)",
            "resumable uploads",
            {
                "201": {
                    "description": "Created; with a body, its bytes are stored. A creation repeated with its Idempotency-Key: the upload the first one made, as it stands; a repeat's body adds the bytes past the upload's offset (those before it are checked against Upload-Checksum only)",
                    "headers": _tus_headers(
                        "Location",
                        "Upload-Offset",
                        "Upload-Expires",
                        "Upload-File-Id",
                        "Upload-Storage-Element-Id",
                        "Idempotent-Replayed",
                    ),
                },
                "400": _tus_error(
                    "A tus header or an Upload-Metadata value is wrong",
                    400,
                    ["INVALID_TUS_HEADER", "INVALID_FIELD", "INVALID_METADATA", "BAD_REQUEST"],
                ),
                "401": unauthorized,
                "403": _tus_error(
                    "The token cannot upload, or a part to concatenate is not yours",
                    403,
                    ["FORBIDDEN"],
                ),
                "408": _tus_error(
                    "The body stopped, or came below the minimum rate (what arrived is kept)",
                    408,
                    ["CLIENT_TIMEOUT", "CLIENT_TOO_SLOW"],
                ),
                "412": _tus_error("Unsupported Tus-Resumable", 412, ["TUS_VERSION_UNSUPPORTED"]),
                "413": _tus_error(
                    "Upload-Length (or the body) is over Tus-Max-Size; a body past Upload-Length creates nothing",
                    413,
                    ["FILE_TOO_LARGE"],
                ),
                "422": _tus_error(
                    "This Idempotency-Key created another upload (another length or metadata)",
                    422,
                    ["IDEMPOTENCY_KEY_REUSED"],
                ),
                "429": _tus_error(
                    "This user's unfinished uploads are at their cap (count, or declared bytes)",
                    429,
                    ["TOO_MANY_OPEN_UPLOADS", "UPLOAD_QUOTA_EXCEEDED"],
                ),
                "415": _tus_error(
                    "A body that is not application/offset+octet-stream",
                    415,
                    ["UNSUPPORTED_MEDIA_TYPE"],
                ),
                "460": _tus_error(
                    "Upload-Checksum does not match the body (discarded)",
                    460,
                    ["UPLOAD_CHECKSUM_MISMATCH"],
                ),
                "503": _tus_error(
                    "Spool full, store unreachable, or shutting down",
                    503,
                    ["SERVICE_BUSY", "TUS_STORE_UNAVAILABLE", "SHUTTING_DOWN"],
                ),
            },
            security=bearer,
            parameters=[
                version,
                override,
                _tus_header(
                    "Upload-Length",
                    "the upload's length in bytes",
                    schema={"type": "string", "pattern": "^[0-9]+$"},
                ),
                _tus_header("Upload-Defer-Length", "`1`: the length comes with a later PATCH"),
                _tus_header(
                    "Upload-Metadata",
                    "comma-separated `key base64(value)`: filename, filetype, description, retention_policy, ttl_days, compress, compression_algorithm, metadata",
                ),
                _tus_header("Upload-Concat", "`partial`, or `final;<url> <url> ...`"),
                _tus_header("Upload-Checksum", "`<sha1|md5|sha256> <base64>` of the body"),
                _tus_header(
                    "Idempotency-Key",
                    "a creation sent again with the same key (same user, while the upload is known; not on a final concatenation) gets the upload the first one made, not a second one; one with a body sent while the first is still open makes the first let go (it saves what it got) and adds the rest of its body; one without waits for the first (or gets 423); the key's upload expired: 410",
                    schema={"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                ),
            ],
            requestBody=body,
        ),
    }
    resource = {
        "options": _operation(
            "tusOptionsUpload",
            "tus capabilities (no token)",
            "resumable uploads",
            capabilities,
            parameters=[upload_id],
        ),
        "head": _operation(
            "tusHead",
            "Offset and length of an upload",
            "resumable uploads",
            {
                "200": {
                    "description": "The upload (no body)",
                    "headers": _tus_headers(
                        "Upload-Offset", "Upload-Length", "Cache-Control", "Upload-Expires"
                    ),
                },
                "401": unauthorized,
                "404": not_found,
            },
            security=bearer,
            parameters=[upload_id, version],
        ),
        "patch": _operation(
            "tusPatch",
            "Append bytes at Upload-Offset; the last byte stores the file (as a multipart upload would)",
            "resumable uploads",
            {
                "204": {
                    "description": "Stored up to Upload-Offset; after the last byte, the file's id in Upload-File-Id (a retried final PATCH gets the same)",
                    "headers": _tus_headers(
                        "Upload-Offset",
                        "Upload-Expires",
                        "Upload-File-Id",
                        "Upload-Storage-Element-Id",
                    ),
                },
                "400": _tus_error(
                    "A tus header is wrong", 400, ["INVALID_TUS_HEADER", "BAD_REQUEST"]
                ),
                "401": unauthorized,
                "403": _tus_error(
                    "A final (concatenated) upload cannot be patched",
                    403,
                    ["FINAL_UPLOAD_NOT_PATCHABLE", "FORBIDDEN"],
                ),
                "404": not_found,
                "409": _tus_error(
                    "Upload-Offset is not the upload's offset (nothing changed)",
                    409,
                    ["UPLOAD_OFFSET_MISMATCH"],
                ),
                "410": _tus_error(
                    "The upload expired, or its data is gone",
                    410,
                    ["UPLOAD_EXPIRED", "UPLOAD_DATA_LOST"],
                ),
                "408": _tus_error(
                    "The body stopped, or came below the minimum rate (what arrived is kept)",
                    408,
                    ["CLIENT_TIMEOUT", "CLIENT_TOO_SLOW"],
                ),
                "412": _tus_error("Unsupported Tus-Resumable", 412, ["TUS_VERSION_UNSUPPORTED"]),
                "413": _tus_error(
                    "Past the upload's length (nothing of the chunk is kept) or the chunk limit",
                    413,
                    ["FILE_TOO_LARGE"],
                ),
                "429": _tus_error(
                    "A deferred length declared past this user's cap on declared bytes",
                    429,
                    ["UPLOAD_QUOTA_EXCEEDED"],
                ),
                "415": _tus_error(
                    "Content-Type is not application/offset+octet-stream",
                    415,
                    ["UNSUPPORTED_MEDIA_TYPE"],
                ),
                "423": _tus_error(
                    "Another request holds the upload and could not let go", 423, ["UPLOAD_LOCKED"]
                ),
                "460": _tus_error(
                    "Upload-Checksum does not match (the chunk is discarded, the offset unchanged)",
                    460,
                    ["UPLOAD_CHECKSUM_MISMATCH"],
                ),
                "503": _tus_error(
                    "Spool full, store unreachable, or the file is being stored",
                    503,
                    [
                        "SERVICE_BUSY",
                        "TUS_STORE_UNAVAILABLE",
                        "UPLOAD_COMPLETING",
                        "SHUTTING_DOWN",
                        "NO_STORAGE_AVAILABLE",
                    ],
                ),
            },
            security=bearer,
            parameters=[
                upload_id,
                version,
                _tus_header("Upload-Offset", "where these bytes go", required=True),
                _tus_header("Upload-Length", "with a deferred length"),
                _tus_header("Upload-Checksum", "`<sha1|md5|sha256> <base64>` of the body"),
            ],
            requestBody={**body, "required": True},
        ),
        "delete": _operation(
            "tusTerminate",
            "Remove an unfinished upload and its bytes (termination)",
            "resumable uploads",
            {
                "204": {"description": "Removed", "headers": _tus_headers()},
                "401": unauthorized,
                "404": not_found,
            },
            security=bearer,
            parameters=[upload_id, version],
        ),
        "get": _operation(
            "tusGet",
            "The upload's state, and once stored the multipart upload's 201 body",
            "resumable uploads",
            {
                "200": _json("The upload (`Cache-Control: no-store`)", {"type": "object"}),
                "401": unauthorized,
                "404": not_found,
            },
            security=bearer,
            parameters=[upload_id],
        ),
        "post": _operation(
            "tusOverride",
            "Any of the above through `X-HTTP-Method-Override` (for clients that can only POST)",
            "resumable uploads",
            {
                "401": unauthorized,
                "404": not_found,
                "405": _tus_error(
                    "POST without X-HTTP-Method-Override", 405, ["METHOD_NOT_ALLOWED"]
                ),
            },
            security=bearer,
            parameters=[upload_id, override],
        ),
    }
    return {"/api/v1/uploads": collection, "/api/v1/uploads/{upload_id}": resource}


def _finalize_transaction() -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}
    return {
        "type": "object",
        "required": ["transaction_id", "file_id", "status", "source_storage_element_id", "storage_element_id", "storage_element_url", "error", "history"],
        "properties": {
            "transaction_id": {"type": "string", "format": "uuid"},
            "file_id": {"type": "string", "format": "uuid"},
            "status": {"enum": ["pending", "copying", "committing", "committed", "done", "rolling_back", "rolled_back"]},
            "source_storage_element_id": {"type": "string"},
            "target_storage_element_id": nullable_string,
            "storage_element_id": {**nullable_string, "description": "the new location, once committed"},
            "storage_element_url": nullable_string,
            "download_url": nullable_string,
            "original_filename": {"type": "string"},
            "checksum": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "sha256 of the stored bytes, verified on the target"},
            "file_size": {"type": "integer", "minimum": 0},
            "requested_by": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "finalized_at": {**nullable_string, "format": "date-time"},
            "source_delete_after": {**nullable_string, "format": "date-time"},
            "source_deleted": {"type": "boolean"},
            "status_url": {"type": "string"},
            "error": {
                "oneOf": [
                    {"type": "null"},
                    {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": ["string", "null"]}}},
                ],
                "description": "why it was rolled back",
            },
            "history": {
                "type": "array",
                "items": {"type": "object", "required": ["state", "at"], "properties": {"state": {"type": "string"}, "at": {"type": "string", "format": "date-time"}}},
            },
        },
    }  # fmt: skip


def _finalize_paths() -> dict[str, Any]:
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    transaction = _ref("schemas", "FinalizeTransaction")
    unauthorized = _error("No token, or an invalid one", 401, headers=("WWW-Authenticate",))
    busy = _error(
        "Draining, the store (Redis) unreachable, or an element did not answer the look-up",
        503,
        codes=["SHUTTING_DOWN", "FINALIZE_STORE_UNAVAILABLE", "NO_STORAGE_AVAILABLE"],
        headers=("Retry-After",),
    )
    return {
        "/api/v1/finalize/{file_id}": {
            "post": _operation(
                "finalizeFile",
                "Make a temporary file permanent: moved to an rw Storage Element in the background",
                "finalization",
                {
                    "202": {
                        "description": "Accepted: poll `status_url` (also in `Location`)",
                        "headers": _headers() | {"Location": {"description": "the transaction's status", "required": True, "schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": transaction}},
                    },
                    "400": _error("The file id is not a UUID", 400, codes=["INVALID_FIELD"]),
                    "401": unauthorized,
                    "403": _error("The token's role may not upload", 403, codes=["FORBIDDEN"]),
                    "404": _error("No temporary file with this id, or another user's", 404, codes=["FILE_NOT_FOUND"]),
                    "409": _error("Already permanent, or being finalized", 409, codes=["ALREADY_PERMANENT", "FINALIZATION_IN_PROGRESS"]),
                    "502": _error("The Admin Module or the source element answered wrongly", 502, codes=["ADMIN_LOOKUP_FAILED", "STORAGE_ELEMENT_ERROR", "STORAGE_ELEMENT_REJECTED"]),
                    "503": busy,
                },
                security=bearer,
                parameters=[{"name": "file_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}],
            )
        },
        "/api/v1/finalize/{transaction_id}/status": {
            "get": _operation(
                "getFinalizeStatus",
                "State of a finalization and, once committed, the new location",
                "finalization",
                {
                    "200": _json("The transaction (`Cache-Control: no-store`)", transaction),
                    "401": unauthorized,
                    "404": _error("No such transaction, or one that is neither yours nor your file's", 404, codes=["TRANSACTION_NOT_FOUND"]),
                    "503": _error("The store (Redis) is unreachable", 503, codes=["FINALIZE_STORE_UNAVAILABLE"], headers=("Retry-After",)),
                },
                security=bearer,
                parameters=[{"name": "transaction_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}],
            )
        },
        "/api/v1/finalize": {
            "get": _operation(
                "listFinalizations",
                "Recent finalizations, newest first (admins only)",
                "finalization",
                {
                    "200": _json("The transactions kept (`INGESTER_FINALIZE_RETENTION_S`)", {"type": "object", "required": ["transactions", "count"], "properties": {"transactions": {"type": "array", "items": transaction}, "count": {"type": "integer", "minimum": 0}}}),
                    "400": _error("Unknown state, or a limit out of range", 400, codes=["INVALID_FIELD"]),
                    "401": unauthorized,
                    "403": _error("Not an admin", 403, codes=["FORBIDDEN"]),
                    "503": _error("The store (Redis) is unreachable", 503, codes=["FINALIZE_STORE_UNAVAILABLE"], headers=("Retry-After",)),
                },
                security=bearer,
                parameters=[
                    {"name": "state", "in": "query", "required": False, "schema": {"enum": ["pending", "copying", "committing", "committed", "done", "rolling_back", "rolled_back"]}},
                    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                ],
            )
        },
    }  # fmt: skip


def openapi_document(version: str) -> dict[str, Any]:
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    components = _components()
    components["schemas"]["UploadForm"] = _upload_form()
    components["schemas"]["FinalizeTransaction"] = _finalize_transaction()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "artStore Ingester",
            "version": version,
            "description": (
                "The upload front door of artStore: files are streamed onto Storage Elements. "
                "Errors are `{\"error\": {\"code\", \"message\", \"request_id\"}}`; every "
                "response carries `X-Request-ID`."
            ),
        },
        "tags": [
            {"name": "uploads", "description": "Uploads and their progress (bearer token)"},
            {"name": "finalization", "description": "Temporary files made permanent (bearer token)"},
            {"name": "resumable uploads", "description": "tus 1.0.0 at /api/v1/uploads (bearer token; OPTIONS without)"},
            {"name": "operations", "description": "Probes, metrics, service info (no token)"},
            {"name": "description", "description": "This description and its interactive page"},
        ],
        "components": components,
        "paths": {
            "/api/v1/files/upload": {"post": _upload_operation()},
            **_tus_paths(),
            **_finalize_paths(),
            "/api/v1/files/uploads/{upload_id}": {
                "get": _operation(
                    "getUploadProgress",
                    "Progress of an upload in flight or finished recently (`INGESTER_PROGRESS_RETENTION_S`, 5 minutes)",
                    "uploads",
                    {
                        "200": _json("The upload's progress (`Cache-Control: no-store`)", _ref("schemas", "UploadProgress")),
                        "401": _error("No token, or an invalid one", 401, headers=("WWW-Authenticate",)),
                        "404": _error("No such upload, or another user's (only its uploader and admins see it)", 404, codes=["UPLOAD_NOT_FOUND"]),
                    },
                    security=bearer,
                    parameters=[{"name": "upload_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}],
                )
            },
            "/health/live": _probe("live", "Liveness: the process answers", "live"),
            "/health/ready": _probe("ready", "Readiness: a writable Storage Element answers and not shutting down", "ready"),
            "/api/v1/health/live": _probe("liveV1", "Liveness (same as /health/live)", "live"),
            "/api/v1/health/ready": _probe("readyV1", "Readiness (same as /health/ready)", "ready"),
            "/metrics": {
                "get": _operation(
                    "metrics",
                    "Prometheus metrics (put it behind your network policy)",
                    "operations",
                    {"200": {"description": "Prometheus text exposition format 0.0.4", "headers": _headers(), "content": {"text/plain": {"schema": {"type": "string"}}}}},
                )
            },
            "/": {"get": _operation("info", "Service info: version, registry, endpoints", "operations", {"200": _json("Service info", _ref("schemas", "Info"))})},
            "/openapi.json": {
                "get": _operation(
                    "openapi",
                    "This description (OpenAPI 3.1)",
                    "description",
                    {"200": _json("OpenAPI 3.1 document", {"type": "object", "required": ["openapi", "info", "paths"]})},
                )
            },
            "/docs": {
                "get": _operation(
                    "docsPage",
                    "Interactive page for this description (Swagger UI, served locally)",
                    "description",
                    {
                        "200": {"description": "The page", "headers": _headers(), "content": {"text/html": {"schema": {"type": "string"}}}},
                        "404": _error("The page is off (`INGESTER_DOCS_ENABLED=false`, the default)", 404, codes=["NOT_FOUND"]),
                    },
                )
            },
            "/docs/{asset}": {
                "get": _operation(
                    "docsAsset",
                    "A script, style sheet or icon of the interactive page",
                    "description",
                    {
                        "200": {
                            "description": "The file",
                            "headers": _headers(),
                            "content": {
                                "text/javascript": {"schema": {"type": "string"}},
                                "text/css": {"schema": {"type": "string"}},
                                "image/png": {"schema": {"type": "string", "format": "binary"}},
                            },
                        },
                        "404": _error("No such file, or the page is off", 404, codes=["NOT_FOUND"]),
                    },
                    parameters=[{"name": "asset", "in": "path", "required": True, "schema": {"type": "string", "enum": sorted([*ASSETS, INITIALIZER])}}],
                )
            },
        },
    }  # fmt: skip
