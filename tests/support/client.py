"""Client side of the tests: multipart bodies generated on the fly, with their checksums.

Bodies are class-based async iterators (not async generators), so a cancelled request leaves
no `ResourceWarning` behind (warnings are errors in this suite).
"""

from __future__ import annotations

import hashlib
import random
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

import httpx

MIB: Final = 1024 * 1024


def random_chunks(size: int, *, seed: int = 1, chunk: int = MIB) -> Iterator[bytes]:
    """Incompressible bytes, reproducible from the seed, without holding them all."""
    rng = random.Random(seed)
    remaining = size
    while remaining > 0:
        n = min(chunk, remaining)
        yield rng.randbytes(n)
        remaining -= n


def text_chunks(size: int, *, chunk: int = MIB) -> Iterator[bytes]:
    """Compressible, log-like text."""
    rng = random.Random(7)
    words = [b"ingest", b"storage", b"element", b"artstore", b"upload", b"trio", b"nursery"]
    remaining = size
    while remaining > 0:
        n = min(chunk, remaining)
        parts: list[bytes] = []
        length = 0
        while length < n:
            line = b"%d %s %s level=info\n" % (
                rng.randrange(10**6),
                rng.choice(words),
                rng.choice(words),
            )
            parts.append(line)
            length += len(line)
        yield b"".join(parts)[:n]
        remaining -= n


@dataclass
class MultipartUpload:
    """A multipart/form-data body streamed from chunks; `sha256` and `size` fill in as it goes."""

    chunks: Iterable[bytes]
    fields: Sequence[tuple[str, str]] = ()
    filename: str = "data.bin"
    file_content_type: str = "application/octet-stream"
    file_first: bool = False
    trailing_fields: Sequence[tuple[str, str]] = ()
    boundary: str = field(default_factory=lambda: "test" + secrets.token_hex(12))
    size: int = 0
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _field(self, name: str, value: str) -> bytes:
        return (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()

    def parts(self) -> Iterator[bytes]:
        if not self.file_first:
            for name, value in self.fields:
                yield self._field(name, value)
        yield (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{self.filename}"\r\nContent-Type: {self.file_content_type}\r\n\r\n'
        ).encode()
        for chunk in self.chunks:
            self._hash.update(chunk)
            self.size += len(chunk)
            yield chunk
        yield b"\r\n"
        if self.file_first:
            for name, value in self.fields:
                yield self._field(name, value)
        for name, value in self.trailing_fields:
            yield self._field(name, value)
        yield f"--{self.boundary}--\r\n".encode()

    def stream(self) -> AsyncBody:
        return AsyncBody(self.parts())

    def to_bytes(self) -> bytes:
        return b"".join(self.parts())


class AsyncBody(httpx.AsyncByteStream):
    def __init__(self, parts: Iterator[bytes]) -> None:
        self._parts = parts

    def __aiter__(self) -> AsyncBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._parts)
        except StopIteration:
            raise StopAsyncIteration from None


def auth(token: str, **extra: str) -> dict[str, str]:
    """Headers with the bearer token; an empty token sends no Authorization header at all."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(extra)
    return headers


async def post_upload(
    http: httpx.AsyncClient,
    base_url: str,
    token: str,
    body: MultipartUpload,
    *,
    stream: bool = True,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    request_headers = auth(token, **(headers or {}))
    request_headers["Content-Type"] = body.content_type
    if stream:
        content = body.stream()
        request_headers["Transfer-Encoding"] = "chunked"
    else:
        # Declared size: the whole body up front, still through a class-based stream.
        raw = body.to_bytes()
        request_headers["Content-Length"] = str(len(raw))
        content = AsyncBody(iter([raw]))
    return await send_stream(
        http, "POST", base_url + "/api/v1/files/upload", content, request_headers
    )


async def send_stream(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    body: httpx.AsyncByteStream,
    headers: dict[str, str],
) -> httpx.Response:
    """Send `body` as it is: httpx wraps any async iterable passed as `content=` in an async
    generator of its own, which warns when a server answers before the body is sent."""
    request = http.build_request(method, url, headers=headers)
    request.stream = body
    if "Content-Length" not in headers:
        request.headers.pop("Content-Length", None)
    return await http.send(request)
