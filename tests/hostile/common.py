"""What the hostile-input tests share: the checks every attack ends with, raw HTTP over a
socket (for attacks httpx cannot make), and a tus client."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import trio

from tests.conftest import Stack
from tests.support.client import auth
from tests.support.processes import ManagedProcess

TUS_BASE: Final = "/api/v1/uploads"
OFFSET_STREAM: Final = "application/offset+octet-stream"

Spawn = Callable[..., ManagedProcess]


def error_code(response: httpx.Response) -> str:
    """The JSON envelope's code; the envelope is exactly `{"error": {...}}` and its request id
    is the response's `X-Request-ID`."""
    payload = response.json()
    assert set(payload) == {"error"}, payload
    assert payload["error"]["request_id"] == response.headers["X-Request-ID"]
    code: str = payload["error"]["code"]
    return code


async def assert_unharmed(stack: Stack, url: str, before: set[Path]) -> None:
    """Nothing stored beyond `before` on any element, and the ingester at `url` ready."""
    await stack.settled(before)
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        ready = await http.get(url + "/health/ready")
    assert ready.status_code == 200, ready.text


async def until(check: Callable[[], Awaitable[bool]], *, timeout_s: float) -> None:
    """Poll `check` (state in another process) until it holds; `trio.TooSlowError` if not
    within `timeout_s`."""
    with trio.fail_after(timeout_s):
        while True:
            if await check():
                return
            await trio.sleep(0.02)


# --- raw HTTP ----------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json_code(self) -> str:
        import json

        payload = json.loads(self.body)
        assert set(payload) == {"error"}, payload
        assert payload["error"]["request_id"] == self.headers["x-request-id"]
        code: str = payload["error"]["code"]
        return code


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def connect(url: str) -> trio.SocketStream:
    host, port = host_port(url)
    return await trio.open_tcp_stream(host, port)


async def read_response(stream: trio.SocketStream) -> RawResponse:
    """One response: the head, then the body by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise AssertionError(f"the server closed before a whole response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        rest += chunk
    return RawResponse(status, headers, rest[:length])


async def closed_by_server(stream: trio.SocketStream, within_s: float) -> bool:
    """Whether the server closes the connection (EOF or reset) within `within_s`, discarding
    whatever else it sends."""
    with trio.move_on_after(within_s):
        while True:
            try:
                if not await stream.receive_some(65536):
                    return True
            except trio.BrokenResourceError:
                return True
    return False


# --- tus ---------------------------------------------------------------------------------


def b64(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode()


class Tus:
    """A minimal tus client over httpx: one method per request, nothing hidden."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, token: str) -> None:
        self.http = http
        self.base_url = base_url
        self.token = token

    def headers(self, **extra: str) -> dict[str, str]:
        headers = auth(self.token)
        headers["Tus-Resumable"] = "1.0.0"
        headers.update(extra)
        return headers

    def url(self, location: str) -> str:
        return location if location.startswith("http") else self.base_url + location

    async def create(
        self,
        length: int | None,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        request_headers = self.headers(**{"Upload-Metadata": f"filename {b64('h.bin')}"})
        if length is None:
            request_headers["Upload-Defer-Length"] = "1"
        else:
            request_headers["Upload-Length"] = str(length)
        if data is not None:
            request_headers["Content-Type"] = OFFSET_STREAM
        request_headers.update(headers or {})
        return await self.http.post(
            self.base_url + TUS_BASE, headers=request_headers, content=data or b""
        )

    async def new(self, length: int | None) -> str:
        response = await self.create(length)
        assert response.status_code == 201, response.text
        return self.url(response.headers["Location"])

    async def head(self, url: str) -> httpx.Response:
        return await self.http.head(url, headers=self.headers())

    async def offset(self, url: str) -> int:
        response = await self.head(url)
        assert response.status_code == 200, response.headers
        return int(response.headers["Upload-Offset"])

    async def patch(self, url: str, offset: int, data: bytes, **extra: str) -> httpx.Response:
        headers = self.headers(**{"Upload-Offset": str(offset), "Content-Type": OFFSET_STREAM})
        headers.update(extra)
        return await self.http.patch(url, headers=headers, content=data)

    async def delete(self, url: str) -> httpx.Response:
        return await self.http.delete(url, headers=self.headers())


def tus_data_files(stack: Stack, name: str) -> list[Path]:
    """The data files of the ingester `name`'s resumable uploads."""
    directory = stack.root / name / "spool" / "tus"
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.exists() else []
