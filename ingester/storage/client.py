"""HTTP client for Storage Elements: the one place where httpx meets the project.

Every httpx exception and every unexpected status is translated here into the
`StorageElementError` family, so the pipeline decides on retry and failover from our own
types: `StorageElementUnavailable` (nothing or not all reached the element: safe to try
elsewhere), `StorageElementTimeout`, `StorageElementFull`, `StorageElementRejected`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import httpx
import trio

from ..boundary import element_errors
from ..errors import (
    StorageElementError,
    StorageElementFull,
    StorageElementModeRefused,
    StorageElementRejected,
    StorageElementTimeout,
    StorageElementUnavailable,
)
from ..saga.record import Removal

log = logging.getLogger(__name__)

UPLOAD_PATH: Final = "/api/v1/files/upload"
# How an element says its mode takes no uploads: the reference element's code, artStore's text
# ("File upload not allowed in ro mode").
_MODE_REFUSAL_RE: Final = re.compile(r"^READ_ONLY_MODE:|not allowed in (edit|rw|ro|ar) mode")
# FastAPI's answer when it cannot read a form before the route runs: with artStore's element
# that is its temporary disk (Starlette spools each file part past 1 MiB to `TMPDIR`) full or
# failing, an element failure. Our own forms are well-formed by construction.
BODY_PARSE_FAILED: Final = "There was an error parsing the body"
# A readiness answer of 200 whose body says otherwise (artStore's probe answers 200 with
# "degraded" when its storage directory fails).
_NOT_READY_STATUSES: Final = frozenset({"degraded", "not_ready", "unhealthy", "error"})
# A gc delete's `status` when the element held the file (`deleted`: ours and artStore's) or
# the upload in flight (`aborted`: ours, which then never commits it).
GC_REMOVED: Final = frozenset({"deleted", "aborted"})


@dataclass(frozen=True, slots=True)
class StoredFile:
    """What the Storage Element reports after a successful upload."""

    file_id: str
    file_size: int
    checksum: str
    storage_filename: str | None
    raw: Mapping[str, Any]


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return f"{error.get('code')}: {error.get('message')}"
        detail = body.get("detail")
        if detail is not None:
            return str(detail)[:200]
    return str(body)[:200]


def json_object(response: httpx.Response, element_id: str) -> dict[str, Any]:
    """A success answer's JSON object; anything else (an HTML page from a proxy in the
    way, a truncated body) is the element failing the call, not a bug of ours."""
    try:
        payload = response.json()
    except ValueError as exc:
        raise StorageElementError(
            f"{element_id} answered {response.status_code} with a body that is not JSON "
            f"({response.headers.get('content-type', 'no content type')})",
            element_id=element_id,
        ) from exc
    if not isinstance(payload, dict):
        raise StorageElementError(
            f"{element_id} answered {response.status_code} with JSON that is not an object",
            element_id=element_id,
        )
    return payload


def raise_for_status(response: httpx.Response, element_id: str) -> None:
    status = response.status_code
    if status < 400:
        return
    message = f"{element_id} answered {status}: {_error_message(response)}"
    if status == 507:
        raise StorageElementFull(message, element_id=element_id, upstream_status=status)
    if status in (502, 503, 504) or status >= 500:
        raise StorageElementError(message, element_id=element_id, upstream_status=status)
    if status == 429:
        raise StorageElementUnavailable(message, element_id=element_id, upstream_status=status)
    if status == 400 and _MODE_REFUSAL_RE.search(_error_message(response)):
        raise StorageElementModeRefused(message, element_id=element_id)
    if status == 400 and _error_message(response) == BODY_PARSE_FAILED:
        raise StorageElementError(message, element_id=element_id, upstream_status=status)
    raise StorageElementRejected(
        message, element_id=element_id, upstream_status=status, retryable=False
    )


class StorageElementClient:
    """Calls to Storage Elements over one shared HTTP/1.1 connection pool.

    HTTP/1.1 on purpose: HTTP/2 uploads measured slower under trio, and a cancelled h2
    stream broke the shared connection.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        stall_timeout_s: float,
        response_timeout_s: float,
        connect_timeout_s: float,
        probe_timeout_s: float,
    ) -> None:
        self._http = http
        self._upload_timeout = httpx.Timeout(
            connect=connect_timeout_s,
            # The element fsyncs before answering: its answer may take a while.
            read=response_timeout_s,
            # A write that cannot progress for this long is a stalled element.
            write=stall_timeout_s,
            pool=connect_timeout_s,
        )
        self._short_timeout = httpx.Timeout(probe_timeout_s)
        self._call_timeout_s = max(probe_timeout_s, connect_timeout_s) * 3

    async def upload(
        self,
        element_id: str,
        api_url: str,
        *,
        body: httpx.AsyncByteStream,
        content_type: str,
        authorization: str | None,
        extra_headers: Mapping[str, str] | None = None,
        content_length: int | None = None,
    ) -> StoredFile:
        """POST `body`: chunked, or with `content_length` when its length is known (the
        element then parses no chunk framing, and h11 sends each piece as it is)."""
        headers = {"Content-Type": content_type}
        if content_length is None:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(content_length)
        if authorization:
            headers["Authorization"] = authorization
        if extra_headers:
            headers.update(extra_headers)
        request = self._http.build_request(
            "POST", api_url + UPLOAD_PATH, headers=headers, timeout=self._upload_timeout
        )
        # Our class-based body as is: `content=` would wrap it in an async generator of
        # httpx's own, which warns when a cancelled upload leaves it unfinished.
        request.stream = body
        if content_length is None:
            request.headers.pop("Content-Length", None)
        with element_errors(element_id):
            response = await self._http.send(request)
        raise_for_status(response, element_id)
        try:
            payload = response.json()
            return StoredFile(
                file_id=str(payload["file_id"]),
                file_size=int(payload["file_size"]),
                checksum=str(payload["checksum"]).lower(),
                storage_filename=payload.get("storage_filename"),
                raw=payload,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageElementError(
                f"{element_id} answered 201 without a usable body", element_id=element_id
            ) from exc

    async def gc_delete(
        self, element_id: str, api_url: str, file_id: str, *, authorization: str | None
    ) -> Removal:
        """Remove a copy for compensation: whether the element held something. `404`, and
        artStore's `200 already_deleted`, say it held nothing; an answer that does not say
        counts as that too (the cautious reading: see `SagaRecord.landing`)."""
        response = await self._call(
            "DELETE", element_id, f"{api_url}/api/v1/gc/{file_id}", authorization
        )
        if response.status_code not in (200, 204, 404):
            raise_for_status(response, element_id)
            raise StorageElementError(
                f"{element_id} answered {response.status_code} to a removal",
                element_id=element_id,
                upstream_status=response.status_code,
            )
        if response.status_code == 200:
            try:
                status = response.json().get("status")
            except (ValueError, AttributeError):
                status = None
            if status in GC_REMOVED:
                return Removal.REMOVED
        return Removal.ABSENT

    async def exists(
        self, element_id: str, api_url: str, file_id: str, *, authorization: str | None
    ) -> bool:
        response = await self._call(
            "GET", element_id, f"{api_url}/api/v1/gc/{file_id}/exists", authorization
        )
        raise_for_status(response, element_id)
        return bool(json_object(response, element_id).get("exists"))

    async def metadata(
        self, element_id: str, api_url: str, file_id: str, *, authorization: str | None
    ) -> dict[str, Any] | None:
        """`GET /api/v1/files/{id}`: the file's metadata, or None when the element has none."""
        response = await self._call(
            "GET", element_id, f"{api_url}/api/v1/files/{file_id}", authorization
        )
        if response.status_code == 404:
            return None
        raise_for_status(response, element_id)
        return json_object(response, element_id)

    async def delete(
        self, element_id: str, api_url: str, file_id: str, *, authorization: str | None
    ) -> bool:
        """`DELETE /api/v1/files/{id}` (edit mode). True when it is gone (404 counts)."""
        response = await self._call(
            "DELETE", element_id, f"{api_url}/api/v1/files/{file_id}", authorization
        )
        if response.status_code in (200, 204, 404):
            return True
        raise_for_status(response, element_id)
        return False

    @asynccontextmanager
    async def download(
        self, element_id: str, api_url: str, file_id: str, *, authorization: str | None
    ) -> AsyncIterator[httpx.Response]:
        """`GET /api/v1/files/{id}/download`, streamed: the body is read by the caller (a
        read that waits longer than the stall timeout fails). Errors become ours."""
        headers = {"Authorization": authorization} if authorization else {}
        request = self._http.build_request(
            "GET",
            f"{api_url}/api/v1/files/{file_id}/download",
            headers=headers,
            timeout=httpx.Timeout(
                connect=self._upload_timeout.connect,
                read=self._upload_timeout.write,
                write=self._upload_timeout.write,
                pool=self._upload_timeout.pool,
            ),
        )
        with element_errors(element_id):
            response = await self._http.send(request, stream=True)
        try:
            if response.status_code >= 400:
                await response.aread()
                raise_for_status(response, element_id)
            yield response
        finally:
            await response.aclose()

    async def probe_ready(self, element_id: str, api_url: str) -> bool:
        try:
            response = await self._call("GET", element_id, f"{api_url}/health/ready", None)
        except StorageElementError:
            return False
        if response.status_code != 200:
            return False
        try:
            body = response.json()
        except ValueError:
            return True
        status = body.get("status") if isinstance(body, dict) else None
        return not (isinstance(status, str) and status.lower() in _NOT_READY_STATUSES)

    async def info(self, element_id: str, api_url: str) -> dict[str, Any]:
        response = await self._call("GET", element_id, f"{api_url}/api/v1/info", None)
        raise_for_status(response, element_id)
        return json_object(response, element_id)

    async def _call(
        self, method: str, element_id: str, url: str, authorization: str | None
    ) -> httpx.Response:
        headers = {"Authorization": authorization} if authorization else {}
        # httpx's timeouts are per operation; this bounds the whole call.
        with trio.move_on_after(self._call_timeout_s) as scope, element_errors(element_id):
            return await self._http.request(
                method, url, headers=headers, timeout=self._short_timeout
            )
        assert scope.cancelled_caught
        raise StorageElementTimeout(
            f"{element_id}: {method} {url} timed out", element_id=element_id
        )
