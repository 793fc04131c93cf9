"""Building `multipart/form-data` bodies by hand, in any part order, and streaming them; and
reading one back (`parse_form`), as a fake Storage Element does.

httpx always puts the fields before the files; tests of "fields after the file" and of
partial or chunked bodies need the bytes themselves.

Bodies are sent through `ChunkedBody`, a class-based `httpx.AsyncByteStream`: httpx's own
streams (`files=`, `content=` with an async iterable) are async generators, and one left
unfinished (the server answered early, 507 or 409, and stopped reading) is reported as a
ResourceWarning when collected, which this project's tests turn into failures.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import httpx

from ingester.http.multipart import MultipartStreamParser, PartData, PartEnd, PartStart

# Small enough that a few MiB arrive in many chunks, as over a real network.
DEFAULT_CHUNK: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class FilePart:
    data: bytes
    filename: str = "data.bin"
    name: str = "file"
    content_type: str | None = "application/octet-stream"


Part = Field | FilePart


def encode_multipart(parts: Sequence[Part], boundary: str | None = None) -> tuple[str, bytes]:
    """(Content-Type header value, body) of a form with `parts` in this order."""
    boundary = boundary or f"test-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for part in parts:
        chunks.append(f"--{boundary}\r\n".encode())
        if isinstance(part, Field):
            chunks.append(f'Content-Disposition: form-data; name="{part.name}"\r\n\r\n'.encode())
            chunks.append(part.value.encode("utf-8"))
        else:
            disposition = f'form-data; name="{part.name}"; filename="{part.filename}"'
            chunks.append(f"Content-Disposition: {disposition}\r\n".encode())
            if part.content_type is not None:
                chunks.append(f"Content-Type: {part.content_type}\r\n".encode())
            chunks.append(b"\r\n")
            chunks.append(part.data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)


class ChunkedBody(httpx.AsyncByteStream):
    """`data` in chunks of `chunk_size`, as a request stream (see `streaming_request`)."""

    def __init__(self, data: bytes, chunk_size: int = DEFAULT_CHUNK) -> None:
        self._data = memoryview(data)
        self._chunk_size = chunk_size
        self._offset = 0

    def __aiter__(self) -> ChunkedBody:
        return self

    async def __anext__(self) -> bytes:
        if self._offset >= len(self._data):
            raise StopAsyncIteration
        chunk = bytes(self._data[self._offset : self._offset + self._chunk_size])
        self._offset += len(chunk)
        return chunk

    async def aclose(self) -> None:
        self._offset = len(self._data)


def streaming_request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    body: bytes,
    *,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> httpx.Request:
    """A request sending `body` through a `ChunkedBody`, with a Content-Length, or with
    `Transfer-Encoding: chunked` when `chunked` (the server must count the bytes itself)."""
    request = client.build_request(method, url, headers=headers)
    request.stream = ChunkedBody(body, chunk_size)
    if chunked:
        # build_request gave the empty body it saw a `Content-Length: 0`.
        request.headers.pop("Content-Length", None)
        request.headers["Transfer-Encoding"] = "chunked"
    else:
        request.headers["Content-Length"] = str(len(body))
    return request


def parse_form(body: bytes, content_type: str) -> tuple[dict[str, str], bytes]:
    """The text fields and the file of a multipart body, read with the project's parser."""
    boundary = content_type.split("boundary=", 1)[1].encode()
    parser = MultipartStreamParser(boundary)
    fields: dict[str, str] = {}
    data = bytearray()
    name = ""
    value = bytearray()
    for event in parser.feed(body):
        if isinstance(event, PartStart):
            name = event.name
            value = bytearray()
        elif isinstance(event, PartData):
            (data if name == "file" else value).extend(event.data)
        elif isinstance(event, PartEnd) and name != "file":
            fields[name] = value.decode()
    parser.close()
    return fields, bytes(data)
