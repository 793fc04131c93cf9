"""tus 1.0.0 conformance, one test per rule, against a real ingester and real reference
Storage Elements (the module's `stack`). Each test checks what a tus client would: status
codes, headers, offsets; and for completed uploads, that the file downloaded from the
Storage Element has the source's sha256."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from ingester.auth.tokens import make_token
from ingester.tus.service import keyed_upload_id
from ingester.upload.filenames import sanitize_filename
from tests.conftest import Stack, TokenFactory
from tests.support.client import MIB, auth, random_chunks, text_chunks
from tests.support.metrics import read_metric
from tests.support.processes import IngesterProcess, start_ingester
from tests.support.waiting import eventually, eventually_async

BASE: Final = "/api/v1/uploads"
OFFSET_STREAM: Final = "application/offset+octet-stream"
TRIMS: Final = "ingester_memory_trims_total"


def b64(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode()


def metadata_header(metadata: Mapping[str, str | bytes]) -> str:
    return ",".join(f"{key} {b64(value)}" if value else key for key, value in metadata.items())


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

    async def options(self, path: str = BASE) -> httpx.Response:
        return await self.http.options(self.base_url + path)

    async def create(
        self,
        length: int | None,
        *,
        metadata: Mapping[str, str | bytes] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        request_headers = self.headers()
        if length is not None:
            request_headers["Upload-Length"] = str(length)
        if metadata:
            request_headers["Upload-Metadata"] = metadata_header(metadata)
        if data is not None:
            request_headers["Content-Type"] = OFFSET_STREAM
        request_headers.update(headers or {})
        return await self.http.post(
            self.base_url + BASE, headers=request_headers, content=data or b""
        )

    async def new(self, length: int | None, **kwargs: object) -> str:
        response = await self.create(length, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 201, response.text
        return self.url(response.headers["Location"])

    async def head(self, url: str, **extra: str) -> httpx.Response:
        return await self.http.head(url, headers=self.headers(**extra))

    async def offset(self, url: str) -> int:
        response = await self.head(url)
        assert response.status_code == 200, response.headers
        return int(response.headers["Upload-Offset"])

    async def patch(
        self,
        url: str,
        offset: int,
        data: bytes,
        *,
        content_type: str = OFFSET_STREAM,
        **extra: str,
    ) -> httpx.Response:
        headers = self.headers(**{"Upload-Offset": str(offset), "Content-Type": content_type})
        headers.update(extra)
        return await self.http.patch(url, headers=headers, content=data)

    async def delete(self, url: str) -> httpx.Response:
        return await self.http.delete(url, headers=self.headers())

    async def state(self, url: str) -> httpx.Response:
        return await self.http.get(url, headers=auth(self.token))

    async def upload(self, url: str, data: bytes, chunk: int) -> httpx.Response:
        """Every chunk in turn from the server's offset; the last PATCH's answer."""
        offset = await self.offset(url)
        while True:
            piece = data[offset : offset + chunk]
            response = await self.patch(url, offset, piece)
            assert response.status_code == 204, response.text
            offset = int(response.headers["Upload-Offset"])
            if offset == len(data):
                return response


async def download(http: httpx.AsyncClient, stack: Stack, result: Mapping[str, str]) -> bytes:
    element = next(se for se in stack.elements if se.element_id == result["storage_element_id"])
    response = await http.get(
        f"{element.url}/api/v1/files/{result['file_id']}/download",
        headers=auth(stack_token(stack)),
    )
    assert response.status_code == 200, response.text
    return response.content


def stack_token(stack: Stack) -> str:
    return make_token(stack.keys.private_pem, sub="alice", role="user", ttl=600)


def data_file(stack: Stack, url: str, name: str = "ingester") -> Path:
    return stack.root / name / "spool" / "tus" / url.rsplit("/", 1)[-1]


@asynccontextmanager
async def own_ingester(stack: Stack, name: str, **env: str) -> AsyncIterator[IngesterProcess]:
    """An ingester of the test's own, with `env`, beside the stack's: stopped at the end."""
    proc = await trio.to_thread.run_sync(lambda: stack.start_ingester(name, **env))
    try:
        yield proc
    finally:
        proc.terminate()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- core: OPTIONS, HEAD, PATCH, versions, method override --------------------------------


async def test_options_announces_version_extensions_size_and_checksums(stack: Stack) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            for path in (BASE, BASE + "/" + "0" * 32):
                response = await http.options(stack.url + path)  # no token: tus allows it
                assert response.status_code == 204
                headers = response.headers
                assert headers["Tus-Resumable"] == "1.0.0"
                assert headers["Tus-Version"] == "1.0.0"
                assert set(headers["Tus-Extension"].split(",")) == {
                    "creation",
                    "creation-with-upload",
                    "creation-defer-length",
                    "termination",
                    "checksum",
                    "expiration",
                    "concatenation",
                }
                assert int(headers["Tus-Max-Size"]) == 10 * 1024**3
                assert set(headers["Tus-Checksum-Algorithm"].split(",")) == {
                    "sha1",
                    "md5",
                    "sha256",
                }


async def test_creation_and_head(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            created = await tus.create(
                100, metadata={"filename": "a b.txt", "description": "notes", "flag": ""}
            )
            assert created.status_code == 201, created.text
            location = created.headers["Location"]
            assert location.startswith(BASE + "/")
            assert created.headers["Tus-Resumable"] == "1.0.0"
            assert created.headers["Upload-Offset"] == "0"
            assert "GMT" in created.headers["Upload-Expires"]
            head = await tus.head(tus.url(location))
            assert head.status_code == 200
            assert head.headers["Upload-Offset"] == "0"
            assert head.headers["Upload-Length"] == "100"
            assert head.headers["Cache-Control"] == "no-store"
            assert head.headers["Tus-Resumable"] == "1.0.0"
            assert "Upload-Defer-Length" not in head.headers
            echoed = head.headers["Upload-Metadata"].split(",")
            assert set(echoed) == {
                f"filename {b64('a b.txt')}",
                f"description {b64('notes')}",
                "flag",
            }
            assert data_file(stack, location).exists()


async def test_a_creation_sent_again_with_its_idempotency_key_gets_the_same_upload(
    stack: Stack, token: TokenFactory
) -> None:
    """A creation whose answer was lost, sent again with the same Idempotency-Key, gets the
    upload the first one made (as it stands: bytes sent meanwhile count), not a second one
    holding the caller's quota. Another length under the key is 422; another caller's same
    key is another upload."""
    async with own_ingester(stack, "one-open", INGESTER_TUS_MAX_UPLOADS_PER_USER="1") as limited:
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False) as http:
                tus = Tus(http, limited.url, token())
                key = {"Idempotency-Key": "doc-1.pdf/attempt-1"}
                first = await tus.create(10, metadata={"filename": "doc.pdf"}, headers=key)
                assert first.status_code == 201, first.text
                assert "Idempotent-Replayed" not in first.headers
                url = tus.url(first.headers["Location"])
                assert (await tus.patch(url, 0, b"01234")).status_code == 204

                again = await tus.create(10, metadata={"filename": "doc.pdf"}, headers=key)
                assert again.status_code == 201, again.text
                assert again.headers["Location"] == first.headers["Location"]
                assert again.headers["Idempotent-Replayed"] == "true"
                assert again.headers["Upload-Offset"] == "5"
                # The first one is this caller's only open upload: a new one is refused.
                other = await tus.create(10, metadata={"filename": "doc.pdf"})
                assert other.status_code == 429, other.text
                assert other.json()["error"]["code"] == "TOO_MANY_OPEN_UPLOADS"

                longer = await tus.create(11, metadata={"filename": "doc.pdf"}, headers=key)
                assert longer.status_code == 422, longer.text
                assert longer.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"

                bob = Tus(http, limited.url, token(sub="bob"))
                bobs = await bob.create(10, metadata={"filename": "doc.pdf"}, headers=key)
                assert bobs.status_code == 201, bobs.text
                assert bobs.headers["Location"] != first.headers["Location"]
                assert "Idempotent-Replayed" not in bobs.headers

                done = await tus.patch(url, 5, b"56789")
                assert done.status_code == 204, done.text
                stored = (await tus.state(url)).json()["result"]
                assert stored["checksum"] == hashlib.sha256(b"0123456789").hexdigest()
                # Stored, the upload is still what the key made: the repeat says so.
                last = await tus.create(10, metadata={"filename": "doc.pdf"}, headers=key)
                assert last.status_code == 201, last.text
                assert last.headers["Location"] == first.headers["Location"]
                assert last.headers["Upload-Offset"] == "10"
                # ...and names the stored file, as the answer that completed it did.
                assert last.headers["Upload-File-Id"] == stored["file_id"]
                assert last.headers["Upload-Storage-Element-Id"] == stored["storage_element_id"]


async def raw_create_then_cut(
    base_url: str, token: str, key: str, length: int, sent: bytes
) -> None:
    """A creation-with-upload keyed `key` that declares `length` bytes, sends `sent`, and
    drops its connection (RST) before any answer."""
    host, port = base_url.split("//", 1)[1].split(":")
    head = (
        f"POST {BASE} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Tus-Resumable: 1.0.0\r\nUpload-Length: {length}\r\nIdempotency-Key: {key}\r\n"
        f"Upload-Metadata: filename {b64('cut.bin')}\r\n"
        f"Content-Type: {OFFSET_STREAM}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        await stream.send_all(head + sent)
        await trio.sleep(1.0)  # the server reads what arrived (an RST drops what it has not)
    finally:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()


def interrupted_offset(lines: list[str], upload_id: str) -> int | None:
    """The offset an interrupted request of `upload_id` saved, from its log line."""
    for line in lines:
        if '"event": "tus_chunk_interrupted"' in line and upload_id in line:
            return int(json.loads(line)["offset"])
    return None


@pytest.mark.parametrize("with_checksum", [False, True])
async def test_a_repeated_creation_with_upload_takes_the_rest_of_its_body(
    stack: Stack, token: TokenFactory, with_checksum: bool
) -> None:
    """A creation-with-upload cut mid-body, sent again whole with its Idempotency-Key: the
    repeat's bytes past what the first one left are taken (the client loses no round trip
    and no byte is sent for nothing), and the file stored is the one sent. Under
    `Upload-Checksum` the skipped bytes count too: a repeat whose body differs there is
    refused with 460, with the upload's Location, and nothing of it is kept. The spool
    holds 4,000,000 bytes: the cut upload's 1.3 MB and its 3 MiB body would not fit
    twice, so the repeat must be checked for what it adds only (found by a review)."""
    async with own_ingester(
        stack, f"spool-4mb-{with_checksum}", INGESTER_SPOOL_MAX_BYTES="4000000"
    ) as limited:
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False) as http:
                tus = Tus(http, limited.url, token())
                data = b"".join(random_chunks(3 * MIB, seed=31 + with_checksum))
                key = f"cut-then-again-{with_checksum}"
                upload_id = keyed_upload_id("alice", key)
                await raw_create_then_cut(limited.url, token(), key, len(data), data[:1_300_000])
                await eventually(
                    lambda: interrupted_offset(limited.log_lines(), upload_id) is not None,
                    timeout_s=10,
                )
                # What the server had read when the connection was reset (all of it, but
                # for a machine too busy to read 1.3 MB in a second).
                sent = interrupted_offset(limited.log_lines(), upload_id)
                assert sent is not None
                headers = {"Idempotency-Key": key}
                if with_checksum:
                    forged = data[:1000] + b"x" + data[1001:]
                    headers["Upload-Checksum"] = f"sha1 {b64(hashlib.sha1(data).digest())}"
                    refused = await tus.create(
                        len(data), metadata={"filename": "cut.bin"}, data=forged, headers=headers
                    )
                    assert refused.status_code == 460, refused.text
                    assert refused.json()["error"]["code"] == "UPLOAD_CHECKSUM_MISMATCH"
                    assert refused.headers["Upload-Offset"] == str(sent)
                    assert refused.headers["Location"].startswith(BASE + "/")
                again = await tus.create(
                    len(data), metadata={"filename": "cut.bin"}, data=data, headers=headers
                )
                await replayed_whole(http, stack, tus, again, data)


async def replayed_whole(
    http: httpx.AsyncClient, stack: Stack, tus: Tus, answer: httpx.Response, data: bytes
) -> None:
    """Asserts that a repeated creation finished its upload: `201` replayed with every
    byte in and the stored file's id, and the file stored is `data`."""
    assert answer.status_code == 201, answer.text
    assert answer.headers["Idempotent-Replayed"] == "true"
    assert answer.headers["Upload-Offset"] == str(len(data))
    result = (await tus.state(tus.url(answer.headers["Location"]))).json()["result"]
    assert answer.headers["Upload-File-Id"] == result["file_id"]
    assert sha256(await download(http, stack, result)) == sha256(data)


async def test_a_repeated_creation_makes_its_stalled_first_let_go(
    stack: Stack, token: TokenFactory
) -> None:
    """A creation-with-upload whose connection went quiet, sent again whole with its key:
    the first request saves what it got and lets go (as a stalled PATCH does for a new
    one), answering 201 with its offset rather than waiting out its idle timeout (60 s
    here; the repeat would get 423 after the 10 s lock wait), and the repeat stores the
    rest at once."""
    async with own_ingester(stack, "idle-60s", INGESTER_CLIENT_IDLE_TIMEOUT_S="60") as patient:
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False) as http:
                tus = Tus(http, patient.url, token())
                data = b"".join(random_chunks(2 * MIB, seed=12))
                host, port = patient.url.split("//")[1].split(":")
                stalled = await trio.open_tcp_stream(host, int(port))
                key = "stalled-then-again"
                upload_id = keyed_upload_id("alice", key)
                try:
                    await stalled.send_all(
                        (
                            f"POST {BASE} HTTP/1.1\r\nHost: {host}\r\n"
                            f"Authorization: Bearer {token()}\r\nTus-Resumable: 1.0.0\r\n"
                            f"Upload-Length: {len(data)}\r\nIdempotency-Key: {key}\r\n"
                            f"Content-Type: {OFFSET_STREAM}\r\n"
                            f"Content-Length: {len(data)}\r\n\r\n"
                        ).encode()
                        + data[:300_000]
                    )

                    def created() -> bool:
                        return any(
                            '"event": "tus_created"' in line and upload_id in line
                            for line in patient.log_lines()
                        )

                    # The first holds the upload and is reading its body.
                    await eventually(created, timeout_s=10)
                    again = await tus.create(len(data), data=data, headers={"Idempotency-Key": key})
                    # The first let go with what it had read.
                    answer = await stalled.receive_some(4096)
                    assert answer.startswith(b"HTTP/1.1 201"), answer
                    offset = re.search(rb"upload-offset: (\d+)", answer.lower())
                    assert offset is not None
                    assert 0 < int(offset.group(1)) <= 300_000
                finally:
                    await stalled.aclose()
                await replayed_whole(http, stack, tus, again, data)


async def test_patch_at_a_wrong_offset_is_409_and_changes_nothing(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            url = await tus.new(100)
            ok = await tus.patch(url, 0, b"a" * 10)
            assert ok.status_code == 204
            assert ok.headers["Upload-Offset"] == "10"
            assert "GMT" in ok.headers["Upload-Expires"]
            for wrong in (0, 5, 11, 50):
                conflict = await tus.patch(url, wrong, b"b" * 10)
                assert conflict.status_code == 409, wrong
                assert conflict.json()["error"]["code"] == "UPLOAD_OFFSET_MISMATCH"
                assert conflict.headers["Upload-Offset"] == "10"
                assert conflict.headers["Tus-Resumable"] == "1.0.0"
            assert await tus.offset(url) == 10
            # The data file may be an idle one taken over: past the offset it holds old
            # bytes, never the refused ones.
            saved = data_file(stack, url).read_bytes()
            assert saved[:10] == b"a" * 10
            assert b"b" * 10 not in (saved[11:21], saved[50:60])


async def test_patch_with_another_content_type_is_415(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            url = await tus.new(100)
            for content_type in ("application/octet-stream", "text/plain"):
                response = await tus.patch(url, 0, b"x" * 10, content_type=content_type)
                assert response.status_code == 415
                assert response.json()["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
                assert response.headers["Tus-Resumable"] == "1.0.0"
            assert await tus.offset(url) == 0


@pytest.mark.parametrize("version", ["0.2.2", "2.0.0", None])
async def test_an_unsupported_version_is_412_and_not_run(
    stack: Stack, token: TokenFactory, version: str | None
) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            url = await tus.new(100)
            headers = tus.headers(**{"Upload-Offset": "0", "Content-Type": OFFSET_STREAM})
            if version is None:
                del headers["Tus-Resumable"]
            else:
                headers["Tus-Resumable"] = version
            response = await http.patch(url, headers=headers, content=b"x" * 10)
            assert response.status_code == 412
            assert response.headers["Tus-Version"] == "1.0.0"
            assert response.headers["Tus-Resumable"] == "1.0.0"
            assert response.json()["error"]["code"] == "TUS_VERSION_UNSUPPORTED"
            created = await http.post(
                stack.url + BASE,
                headers={**headers, "Upload-Length": "5", "Content-Type": ""},
            )
            assert created.status_code == 412
            assert await tus.offset(url) == 0


async def test_tus_resumable_is_on_every_answer_errors_included(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, "")
            no_token = await tus.create(10)
            assert no_token.status_code == 401
            assert no_token.headers["Tus-Resumable"] == "1.0.0"
            assert no_token.headers["WWW-Authenticate"].startswith("Bearer")
            tus.token = token()
            unknown = await tus.head(stack.url + BASE + "/" + "f" * 32)
            assert unknown.status_code == 404
            assert "Upload-Offset" not in unknown.headers
            assert unknown.headers["Tus-Resumable"] == "1.0.0"
            not_an_id = await tus.patch(stack.url + BASE + "/../../etc", 0, b"x")
            assert not_an_id.status_code == 404
            bad_offset = await tus.patch(await tus.new(10), 0, b"x", **{"Upload-Offset": "-1"})
            assert bad_offset.status_code == 400
            assert bad_offset.json()["error"]["code"] == "INVALID_TUS_HEADER"
            assert bad_offset.headers["Tus-Resumable"] == "1.0.0"


async def test_x_http_method_override(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            url = await tus.new(10)
            patched = await http.post(
                url,
                headers=tus.headers(
                    **{
                        "X-HTTP-Method-Override": "PATCH",
                        "Upload-Offset": "0",
                        "Content-Type": OFFSET_STREAM,
                    }
                ),
                content=b"12345",
            )
            assert patched.status_code == 204, patched.text
            assert patched.headers["Upload-Offset"] == "5"
            headed = await http.post(url, headers=tus.headers(**{"X-HTTP-Method-Override": "HEAD"}))
            assert headed.status_code == 200
            assert headed.headers["Upload-Offset"] == "5"
            deleted = await http.post(
                url, headers=tus.headers(**{"X-HTTP-Method-Override": "DELETE"})
            )
            assert deleted.status_code == 204
            assert (await tus.head(url)).status_code == 404
            plain_post = await http.post(url, headers=tus.headers())
            assert plain_post.status_code == 405


async def test_browsers_may_call_it_across_origins(stack: Stack, token: TokenFactory) -> None:
    """What tus-js-client and Uppy need in a browser: the preflight allows the tus methods and
    headers, and answers expose the headers the client reads."""
    with trio.fail_after(60):
        origin = "http://app.example"
        ingester = stack.start_ingester("tus-cors", INGESTER_CORS_ORIGINS=origin)
        try:
            async with httpx.AsyncClient(trust_env=False) as http:
                tus = Tus(http, ingester.url, token())
                url = await tus.new(10)
                for method in ("POST", "PATCH", "HEAD", "DELETE"):
                    preflight = await http.options(
                        url if method != "POST" else ingester.url + BASE,
                        headers={
                            "Origin": origin,
                            "Access-Control-Request-Method": method,
                            "Access-Control-Request-Headers": (
                                "authorization,content-type,tus-resumable,upload-offset,"
                                "upload-length,upload-metadata,upload-checksum,"
                                "upload-concat,upload-defer-length,x-http-method-override"
                            ),
                        },
                    )
                    assert preflight.status_code == 204
                    assert preflight.headers["Access-Control-Allow-Origin"] == origin
                    assert method in preflight.headers["Access-Control-Allow-Methods"]
                    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
                    for header in ("tus-resumable", "upload-offset", "upload-metadata"):
                        assert header in allowed
                created = await tus.create(10, headers={"Origin": origin})
                exposed = created.headers["Access-Control-Expose-Headers"].lower()
                for header in ("location", "upload-offset", "upload-length", "tus-resumable"):
                    assert header in exposed
        finally:
            ingester.terminate()


# --- extensions --------------------------------------------------------------------------


async def test_creation_with_upload(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            data = b"".join(random_chunks(3 * MIB + 5, seed=11))
            created = await tus.create(len(data), data=data[: 2 * MIB])
            assert created.status_code == 201, created.text
            assert created.headers["Upload-Offset"] == str(2 * MIB)
            url = tus.url(created.headers["Location"])
            final = await tus.upload(url, data, MIB)
            result = (await tus.state(url)).json()["result"]
            assert final.headers["Upload-File-Id"] == result["file_id"]
            assert sha256(await download(http, stack, result)) == sha256(data)


async def test_creation_with_the_whole_upload_stores_it_at_once(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            data = b"all at once " * 1000
            created = await tus.create(len(data), data=data, metadata={"filename": "once.txt"})
            assert created.status_code == 201, created.text
            assert created.headers["Upload-Offset"] == str(len(data))
            assert created.headers["Upload-File-Id"]
            state = (await tus.state(tus.url(created.headers["Location"]))).json()
            assert state["state"] == "done"
            assert state["result"]["original_filename"] == "once.txt"
            assert sha256(await download(http, stack, state["result"])) == sha256(data)


async def test_a_zero_length_upload_is_stored_at_creation(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            created = await tus.create(0, metadata={"filename": "empty.txt"})
            assert created.status_code == 201, created.text
            assert created.headers["Upload-Offset"] == "0"
            state = (await tus.state(tus.url(created.headers["Location"]))).json()
            assert state["result"]["file_size"] == 0
            assert created.headers["Upload-File-Id"] == state["result"]["file_id"]
            assert await download(http, stack, state["result"]) == b""


async def test_deferred_length(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            created = await tus.create(None, headers={"Upload-Defer-Length": "1"})
            assert created.status_code == 201, created.text
            url = tus.url(created.headers["Location"])
            head = await tus.head(url)
            assert head.headers["Upload-Defer-Length"] == "1"
            assert "Upload-Length" not in head.headers
            first = await tus.patch(url, 0, b"a" * 1000)
            assert first.status_code == 204
            bad = await tus.create(None, headers={"Upload-Defer-Length": "yes"})
            assert bad.status_code == 400
            last = await tus.patch(url, 1000, b"b" * 500, **{"Upload-Length": "1500"})
            assert last.status_code == 204, last.text
            assert last.headers["Upload-Offset"] == "1500"
            assert last.headers["Upload-File-Id"]
            head = await tus.head(url)
            assert head.headers["Upload-Length"] == "1500"
            assert "Upload-Defer-Length" not in head.headers
            result = (await tus.state(url)).json()["result"]
            assert sha256(await download(http, stack, result)) == sha256(b"a" * 1000 + b"b" * 500)


async def test_a_deferred_length_declared_without_a_body_is_kept(
    stack: Stack, token: TokenFactory
) -> None:
    """A PATCH that only declares the length (no bytes) is answered 204 and must be saved:
    HEAD then says the length, and the last chunk, sent without it, completes the upload."""
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            url = await tus.new(None, headers={"Upload-Defer-Length": "1"})
            assert (await tus.patch(url, 0, b"a" * 1000)).status_code == 204
            declared = await tus.patch(url, 1000, b"", **{"Upload-Length": "3000"})
            assert declared.status_code == 204, declared.text
            assert declared.headers["Upload-Offset"] == "1000"
            head = await tus.head(url)
            assert head.headers["Upload-Length"] == "3000"
            assert "Upload-Defer-Length" not in head.headers
            last = await tus.patch(url, 1000, b"b" * 2000)
            assert last.status_code == 204, last.text
            assert last.headers["Upload-File-Id"]
            result = (await tus.state(url)).json()["result"]
            assert sha256(await download(http, stack, result)) == sha256(b"a" * 1000 + b"b" * 2000)


async def test_termination(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            url = await tus.new(100)
            assert (await tus.patch(url, 0, b"x" * 40)).status_code == 204
            assert data_file(stack, url).exists()
            deleted = await tus.delete(url)
            assert deleted.status_code == 204
            assert deleted.headers["Tus-Resumable"] == "1.0.0"
            assert not data_file(stack, url).exists()
            assert (await tus.head(url)).status_code == 404
            assert (await tus.patch(url, 40, b"x")).status_code == 404
            assert (await tus.delete(url)).status_code == 404


@pytest.mark.parametrize("damage", ["removed", "cut short"])
async def test_a_patch_whose_data_file_is_lost_is_410_and_keeps_nothing(
    stack: Stack, token: TokenFactory, damage: str
) -> None:
    """The data file removed or cut outside the ingester: the next `PATCH` with data is
    `410 UPLOAD_DATA_LOST` (found by its first write, the file opening there), its offset
    stays, no file is made again, and the service goes on serving."""
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            data = b"".join(random_chunks(3 * MIB, seed=43))
            url = await tus.new(len(data))
            assert (await tus.patch(url, 0, data[:MIB])).status_code == 204
            path = data_file(stack, url)
            if damage == "removed":
                path.unlink()
            else:
                os.truncate(path, 10)
            lost = await tus.patch(url, MIB, data[MIB:])
            assert lost.status_code == 410, lost.text
            assert lost.json()["error"]["code"] == "UPLOAD_DATA_LOST"
            assert lost.headers["Upload-Offset"] == str(MIB)
            assert await tus.offset(url) == MIB
            assert path.exists() == (damage == "cut short")
            if path.exists():
                assert path.stat().st_size == 10
            # The next upload is served as ever.
            other = b"".join(random_chunks(MIB + 7, seed=44))
            fresh = await tus.new(len(other))
            await tus.upload(fresh, other, MIB)
            result = (await tus.state(fresh)).json()["result"]
            assert sha256(await download(http, stack, result)) == sha256(other)


@pytest.mark.parametrize("algorithm", ["sha1", "md5", "sha256"])
async def test_checksum(stack: Stack, token: TokenFactory, algorithm: str) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            url = await tus.new(200)
            good = b"g" * 100

            def checksum(data: bytes) -> str:
                return f"{algorithm} {b64(hashlib.new(algorithm, data).digest())}"

            ok = await tus.patch(url, 0, good, **{"Upload-Checksum": checksum(good)})
            assert ok.status_code == 204, ok.text
            assert ok.headers["Upload-Offset"] == "100"
            bad = await tus.patch(url, 100, b"x" * 100, **{"Upload-Checksum": checksum(b"y" * 100)})
            assert bad.status_code == 460
            assert bad.json()["error"]["code"] == "UPLOAD_CHECKSUM_MISMATCH"
            assert bad.headers["Upload-Offset"] == "100"
            assert await tus.offset(url) == 100
            unknown = await tus.patch(url, 100, b"x", **{"Upload-Checksum": "crc32 AAAAAA=="})
            assert unknown.status_code == 400
            assert await tus.offset(url) == 100
            # The discarded chunk's bytes may still be in the data file, past the offset:
            # the right chunk writes over them, and none of them is stored.
            rest = b"r" * 100
            last = await tus.patch(url, 100, rest, **{"Upload-Checksum": checksum(rest)})
            assert last.status_code == 204, last.text
            result = (await tus.state(url)).json()["result"]
            assert sha256(await download(http, stack, result)) == sha256(good + rest)


async def test_concatenation(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            pieces = [b"".join(random_chunks(MIB + i, seed=20 + i)) for i in range(3)]
            urls = [await tus.new(len(p), headers={"Upload-Concat": "partial"}) for p in pieces]
            head = await tus.head(urls[0])
            assert head.headers["Upload-Concat"] == "partial"

            async def send(url: str, data: bytes) -> None:
                await tus.upload(url, data, 256 * 1024)

            # Partial uploads in parallel, as tus-js-client's parallelUploads does.
            async with trio.open_nursery() as nursery:
                for url, piece in zip(urls, pieces, strict=True):
                    nursery.start_soon(send, url, piece)
            # Partial uploads are not stored on their own.
            assert (await tus.state(urls[0])).json()["result"] is None
            # Absolute and relative URLs, as clients send them.
            concat = "final;" + " ".join([urls[0], *(u.removeprefix(stack.url) for u in urls[1:])])
            final = await tus.create(
                None, headers={"Upload-Concat": concat}, metadata={"filename": "joined.bin"}
            )
            assert final.status_code == 201, final.text
            total = sum(len(p) for p in pieces)
            assert final.headers["Upload-Offset"] == str(total)
            final_url = tus.url(final.headers["Location"])
            head = await tus.head(final_url)
            assert head.headers["Upload-Length"] == head.headers["Upload-Offset"] == str(total)
            assert head.headers["Upload-Concat"] == concat
            state = (await tus.state(final_url)).json()
            assert final.headers["Upload-File-Id"] == state["result"]["file_id"]
            assert state["result"]["original_filename"] == "joined.bin"
            stored = await download(http, stack, state["result"])
            assert sha256(stored) == sha256(b"".join(pieces))
            patched = await tus.patch(final_url, total, b"x")
            assert patched.status_code == 403
            # The partial uploads were used up.
            assert all(not data_file(stack, u).exists() for u in urls)
            assert (await tus.head(urls[0])).status_code == 404


async def test_partial_uploads_an_admin_joins_count_no_more_for_their_uploader(
    stack: Stack, token: TokenFactory
) -> None:
    """Found by a review: once an admin's final upload had used up a user's partial uploads,
    they were uncounted under the admin, and stayed against the user's cap."""
    with trio.fail_after(60):
        ingester = stack.start_ingester("tus-joined", INGESTER_TUS_MAX_UPLOADS_PER_USER="2")
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
                alice = Tus(http, ingester.url, token())
                admin = Tus(http, ingester.url, token(sub="root", role="admin"))
                pieces = [b"a" * 1000, b"b" * 2000]
                urls = []
                for piece in pieces:
                    url = await alice.new(len(piece), headers={"Upload-Concat": "partial"})
                    assert (await alice.patch(url, 0, piece)).status_code == 204
                    urls.append(url)
                over = await alice.create(10)
                assert over.status_code == 429, over.text
                final = await admin.create(
                    None, headers={"Upload-Concat": "final;" + " ".join(urls)}
                )
                assert final.status_code == 201, final.text
                # Used up: alice may open two uploads again.
                for _ in range(2):
                    again = await alice.create(10)
                    assert again.status_code == 201, again.text
        finally:
            ingester.terminate()


async def test_concatenation_of_unfinished_or_foreign_parts_is_refused(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            unfinished = await tus.new(10, headers={"Upload-Concat": "partial"})
            refused = await tus.create(None, headers={"Upload-Concat": f"final;{unfinished}"})
            assert refused.status_code == 400
            not_partial = await tus.new(10)
            refused = await tus.create(None, headers={"Upload-Concat": f"final;{not_partial}"})
            assert refused.status_code == 400
            bob = Tus(http, stack.url, token(sub="bob"))
            bobs = await bob.new(1, headers={"Upload-Concat": "partial"})
            assert (await bob.patch(bobs, 0, b"x")).status_code == 204
            refused = await tus.create(None, headers={"Upload-Concat": f"final;{bobs}"})
            assert refused.status_code == 404
            with_length = await tus.create(5, headers={"Upload-Concat": f"final;{bobs}"})
            assert with_length.status_code == 400


async def test_upload_fields_in_metadata(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            data = b"".join(text_chunks(2 * MIB))
            url = await tus.new(
                len(data),
                metadata={
                    "filename": "app.log",
                    "filetype": "text/plain",
                    "retention_policy": "permanent",
                    "compress": "true",
                    "compression_algorithm": "gzip",
                    "description": "logs",
                    "metadata": json.dumps({"project": "x"}),
                },
            )
            await tus.upload(url, data, MIB)
            result = (await tus.state(url)).json()["result"]
            assert result["storage_element_id"] == "se-rw"
            assert result["retention_policy"] == "permanent"
            assert result["compressed"] is True
            assert result["compression_algorithm"] == "gzip"
            assert result["content_type"] == "text/plain"
            assert result["checksum"] == sha256(data)
            assert result["upload_id"] == url.rsplit("/", 1)[-1]


async def test_the_file_name_is_taken_as_a_multipart_uploads_is(
    stack: Stack, token: TokenFactory
) -> None:
    """The name goes to the pipeline as it came, with no form written and read again on the
    way (issue 13): sanitized as a multipart upload's, and whatever its length (this one is
    over the 4224 bytes python-multipart allows a part header, which used to fail the
    completion with 400 MALFORMED_MULTIPART)."""
    name = 'q"uote\r\n' + "日本" * 1000 + ".txt"
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            created = await tus.create(3, data=b"abc", metadata={"filename": name})
            assert created.status_code == 201, created.text
            state = (await tus.state(tus.url(created.headers["Location"]))).json()
    result = state["result"]
    assert result["original_filename"] == sanitize_filename(name)
    assert result["original_filename"].startswith('q"uote日本')
    assert result["content_type"] == "text/plain"


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ({"retention_policy": "forever"}, "INVALID_FIELD"),
        ({"ttl_days": "0"}, "INVALID_FIELD"),
        ({"metadata": "[1]"}, "INVALID_METADATA"),
        ({"description": b"\xff"}, "INVALID_FIELD"),
    ],
)
async def test_invalid_metadata_fields_are_refused_at_creation(
    stack: Stack, token: TokenFactory, metadata: dict[str, str | bytes], code: str
) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            response = await tus.create(10, metadata=metadata)
            assert response.status_code == 400
            assert response.json()["error"]["code"] == code
            bad_header = await tus.create(10, headers={"Upload-Metadata": "filename !!"})
            assert bad_header.status_code == 400
            assert bad_header.json()["error"]["code"] == "INVALID_TUS_HEADER"


# --- completion --------------------------------------------------------------------------


async def test_completion_result_in_get_and_in_the_final_patch(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            data = b"".join(random_chunks(5 * MIB + 123, seed=7))
            url = await tus.new(len(data), metadata={"filename": "five.bin"})
            in_progress = await tus.state(url)
            assert in_progress.status_code == 200
            assert in_progress.headers["Cache-Control"] == "no-store"
            assert in_progress.json()["state"] == "receiving"
            assert in_progress.json()["offset"] == 0
            final = await tus.upload(url, data, 2 * MIB)
            file_id = final.headers["Upload-File-Id"]
            assert final.headers["Upload-Storage-Element-Id"] == "se-edit"
            assert final.headers["Upload-Offset"] == str(len(data))
            state = (await tus.state(url)).json()
            assert state["state"] == "done"
            assert state["offset"] == state["length"] == len(data)
            result = state["result"]
            assert result["file_id"] == file_id
            assert result["file_size"] == len(data)
            assert result["checksum"] == sha256(data)
            assert result["original_filename"] == "five.bin"
            assert sha256(await download(http, stack, result)) == sha256(data)
            head = await tus.head(url)
            assert head.headers["Upload-Offset"] == head.headers["Upload-Length"]
            assert "Upload-Expires" not in head.headers
            # The data file went with the stored upload.
            assert not data_file(stack, url).exists()


async def test_a_retried_final_patch_returns_the_same_result_and_stores_once(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            data = b"".join(random_chunks(MIB, seed=8))
            url = await tus.new(len(data))
            assert (await tus.patch(url, 0, data[:1000])).status_code == 204
            before = stack.all_files()
            final = await tus.patch(url, 1000, data[1000:])
            assert final.status_code == 204
            stored = stack.all_files() - before
            assert len(stored) == 2  # the file and its attr.json
            # The same request again (a client that did not see the answer), and the
            # offset == length form.
            again = await tus.patch(url, 1000, data[1000:])
            at_end = await tus.patch(url, len(data), b"")
            for retry in (again, at_end):
                assert retry.status_code == 204, retry.text
                assert retry.headers["Upload-File-Id"] == final.headers["Upload-File-Id"]
                assert retry.headers["Upload-Offset"] == str(len(data))
            assert stack.all_files() - before == stored
            # Anything else is the offset conflict it always was.
            assert (await tus.patch(url, 0, data[:10])).status_code == 409


async def test_a_failed_store_sends_the_client_back_to_the_last_chunk(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(60):
        # An element that refuses connections: every store fails, quickly.
        dead: dict[str, object] = {"id": "dead", "api_url": "http://127.0.0.1:1", "mode": "edit"}
        ingester = start_ingester(
            stack.root,
            name="tus-dead-element",
            public_key=stack.keys.public_path,
            elements=[dead],
            env={"INGESTER_RETRY_MAX_ATTEMPTS": "1"},
        )
        try:
            async with httpx.AsyncClient(trust_env=False) as http:
                tus = Tus(http, ingester.url, token())
                url = await tus.new(20)
                assert (await tus.patch(url, 0, b"a" * 10)).status_code == 204
                failed = await tus.patch(url, 10, b"b" * 10)
                assert failed.status_code == 503, failed.text
                code = failed.json()["error"]["code"]
                assert code in ("NO_STORAGE_AVAILABLE", "STORAGE_ELEMENT_UNAVAILABLE")
                # Not reported complete: HEAD says where the client resumes.
                assert failed.headers["Upload-Offset"] == "10"
                assert await tus.offset(url) == 10
                state = (await tus.state(url)).json()
                assert state["state"] == "receiving"
                assert state["last_error"]["code"] == code
        finally:
            ingester.terminate()


# --- ownership and limits ----------------------------------------------------------------


async def test_only_the_uploader_or_an_admin_sees_an_upload(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(15):
        async with httpx.AsyncClient(trust_env=False) as http:
            alice = Tus(http, stack.url, token())
            url = await alice.new(10)
            assert (await alice.patch(url, 0, b"12345")).status_code == 204
            bob = Tus(http, stack.url, token(sub="bob"))
            for response in (
                await bob.head(url),
                await bob.patch(url, 5, b"x"),
                await bob.delete(url),
                await bob.state(url),
            ):
                assert response.status_code == 404
                assert response.headers["Tus-Resumable"] == "1.0.0"
            assert await alice.offset(url) == 5
            admin = Tus(http, stack.url, token(sub="root", role="admin"))
            assert await admin.offset(url) == 5
            reader = Tus(http, stack.url, token(role="readonly"))
            assert (await reader.create(10)).status_code == 403
            assert (await reader.patch(url, 5, b"x")).status_code == 403


async def test_memory_is_given_back_after_tus_uploads_alone(
    stack: Stack, token: TokenFactory
) -> None:
    """The idle trim (ingester.allocator) follows PATCHes as it follows multipart uploads: a
    process that received resumable uploads gives freed memory back once PATCHes stop, also
    those no pipelined store followed (one does count as an upload: its length known)."""
    with trio.fail_after(60):
        ingester = stack.start_ingester("tus-trim")
        try:
            async with httpx.AsyncClient(trust_env=False) as http:
                # Nothing served yet: nothing to give back.
                assert await read_metric(ingester.url, TRIMS) == 0
                tus = Tus(http, ingester.url, token())
                # Its length deferred: no pipelined store, PATCHes only.
                url = await tus.new(None, headers={"Upload-Defer-Length": "1"})
                for offset in range(0, 4 * MIB, MIB):
                    assert (await tus.patch(url, offset, b"a" * MIB)).status_code == 204

                async def trimmed() -> bool:
                    return await read_metric(ingester.url, TRIMS) == 1

                # The trim looks every 5 s (TRIM_INTERVAL_S).
                await eventually_async(trimmed, timeout_s=30)
                assert await tus.offset(url) == 4 * MIB
        finally:
            ingester.terminate()


async def test_uploads_over_the_size_limit_are_413(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(60):
        ingester = stack.start_ingester(
            "tus-small",
            INGESTER_TUS_MAX_SIZE="1000",
            INGESTER_TUS_MAX_CHUNK_SIZE="600",
        )
        try:
            async with httpx.AsyncClient(trust_env=False) as http:
                tus = Tus(http, ingester.url, token())
                assert (await tus.options()).headers["Tus-Max-Size"] == "1000"
                too_big = await tus.create(1001)
                assert too_big.status_code == 413
                assert too_big.json()["error"]["code"] == "FILE_TOO_LARGE"
                url = await tus.new(1000)
                big_chunk = await tus.patch(url, 0, b"x" * 601)
                assert big_chunk.status_code == 413
                assert (await tus.patch(url, 0, b"x" * 600)).status_code == 204
                past_end = await tus.patch(url, 600, b"x" * 401)
                assert past_end.status_code == 413
                assert await tus.offset(url) == 600
                deferred = await tus.new(None, headers={"Upload-Defer-Length": "1"})
                declared = await tus.patch(deferred, 0, b"", **{"Upload-Length": "1001"})
                assert declared.status_code == 413
        finally:
            ingester.terminate()


async def test_patches_answer_when_the_stream_may_not_trail_them(
    stack: Stack, token: TokenFactory
) -> None:
    """INGESTER_TUS_PIPELINE_LAG_BYTES=0 (the stream in step with the PATCHes): a PATCH whose
    last batch leaves part of a MiB used to wait for the stream, which waited for a whole
    MiB from that PATCH, until something interrupted it."""
    with trio.fail_after(60):
        ingester = stack.start_ingester("tus-in-step", INGESTER_TUS_PIPELINE_LAG_BYTES="0")
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
                tus = Tus(http, ingester.url, token())
                data = b"".join(random_chunks(9 * MIB + 12345, seed=77))
                url = await tus.new(len(data))
                first = await tus.patch(url, 0, data[: 6 * MIB + 7])
                assert first.status_code == 204, first.text
                last = await tus.patch(url, 6 * MIB + 7, data[6 * MIB + 7 :])
                assert last.status_code == 204, last.text
                result = (await tus.state(url)).json()["result"]
                assert result["checksum"] == sha256(data)
                assert sha256(await download(http, stack, result)) == sha256(data)
        finally:
            ingester.terminate()


async def test_a_full_spool_is_503_with_retry_after(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(60):
        ingester = stack.start_ingester("tus-spool", INGESTER_SPOOL_MAX_BYTES="1000")
        try:
            async with httpx.AsyncClient(trust_env=False) as http:
                tus = Tus(http, ingester.url, token())
                url = await tus.new(5000)
                assert (await tus.patch(url, 0, b"x" * 800)).status_code == 204
                full = await tus.patch(url, 800, b"x" * 800)
                assert full.status_code == 503
                assert full.json()["error"]["code"] == "SERVICE_BUSY"
                assert int(full.headers["Retry-After"]) > 0
                assert await tus.offset(url) == 800
                # Terminating frees the room.
                assert (await tus.delete(url)).status_code == 204
                again = await tus.new(5000)
                assert (await tus.patch(again, 0, b"x" * 900)).status_code == 204
        finally:
            ingester.terminate()


# --- durability and let-go ---------------------------------------------------------------


async def test_a_last_chunk_whose_client_leaves_before_the_answer_is_still_stored(
    stack: Stack, token: TokenFactory
) -> None:
    """The client sends its last chunk whole and closes the connection before the answer.
    Its next HEAD says every byte is in, and tus clients then send nothing more: the upload
    must be stored all the same. (Two causes, both found in review: the completion began
    only if the request survived, and bytes received but not yet read by the request were
    dropped with it.)"""
    with trio.fail_after(60):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            tus = Tus(http, stack.url, token())
            data = b"".join(random_chunks(8 * MIB + 321, seed=81))
            url = await tus.new(len(data))
            assert (await tus.patch(url, 0, data[: 3 * MIB])).status_code == 204
            rest = data[3 * MIB :]
            host, port, head = raw_patch_head(url, token(), 3 * MIB, len(rest))
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(head + rest)
            await stream.aclose()  # every byte sent, no answer read

            async def stored() -> bool:
                return bool((await tus.state(url)).json()["state"] == "done")

            await eventually_async(stored, timeout_s=30)
            result = (await tus.state(url)).json()["result"]
            assert result["checksum"] == sha256(data)
            assert sha256(await download(http, stack, result)) == sha256(data)
            head_answer = await tus.head(url)
            assert head_answer.headers["Upload-Offset"] == str(len(data))


def raw_patch_head(url: str, token: str, offset: int, declared: int) -> tuple[str, int, bytes]:
    """Host, port and the head of a PATCH to `url` at `offset` declaring `declared` bytes."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    head = (
        f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
        f"Content-Type: {OFFSET_STREAM}\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    return host, int(port), head


async def raw_patch_then_cut(url: str, token: str, offset: int, declared: int, sent: bytes) -> None:
    """A PATCH that declares `declared` bytes, sends `sent`, waits, and drops the connection."""
    host, port, head = raw_patch_head(url, token, offset, declared)
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(head + sent)
        await trio.sleep(1.0)  # the server reads what arrived
    finally:
        # An abortive close (RST), as when a network drops.
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()


async def tus_metrics(http: httpx.AsyncClient, stack: Stack) -> dict[str, float]:
    text = (await http.get(stack.url + "/metrics")).text
    found = {
        name: float(value)
        for name, value in re.findall(
            r'^ingester_tus_uploads_total\{event="(\w+)"\} (\S+)$', text, re.MULTILINE
        )
    }
    received = re.search(r"^ingester_tus_received_bytes_total (\S+)$", text, re.MULTILINE)
    assert received is not None
    found["received"] = float(received.group(1))
    return found


async def test_a_dropped_connection_keeps_the_bytes_that_arrived(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            before = await tus_metrics(http, stack)
            data = b"".join(random_chunks(3 * MIB, seed=9))
            url = await tus.new(len(data))
            sent = 1_234_567
            await raw_patch_then_cut(url, token(), 0, len(data), data[:sent])
            # An operator sees it: one line with the offset saved.
            upload_id = url.rsplit("/", 1)[1]

            def logged() -> bool:
                return any(
                    '"event": "tus_chunk_interrupted"' in line
                    and upload_id in line
                    and f'"offset": {sent}' in line
                    for line in stack.ingester.log_lines()
                )

            await eventually(logged, timeout_s=5)
            assert await tus.offset(url) == sent
            # The file may be longer (an idle file taken over): what counts is up to the offset.
            with data_file(stack, url).open("rb") as saved:
                assert saved.read(sent) == data[:sent]
            after = await tus_metrics(http, stack)
            assert after["created"] - before["created"] == 1
            assert after["interrupted"] - before["interrupted"] == 1
            assert after["received"] - before["received"] == sent
            final = await tus.upload(url, data, MIB)
            result = (await tus.state(url)).json()["result"]
            assert final.headers["Upload-File-Id"] == result["file_id"]
            assert sha256(await download(http, stack, result)) == sha256(data)


async def test_a_new_request_makes_a_stalled_patch_let_go(
    stack: Stack, token: TokenFactory
) -> None:
    """A client whose connection went quiet reconnects: HEAD gets the bytes the old PATCH
    holds (it saves them and lets go), and the new PATCH goes on from there, no 423."""
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            data = b"".join(random_chunks(2 * MIB, seed=10))
            url = await tus.new(len(data))
            host, port = stack.url.split("//")[1].split(":")
            stalled = await trio.open_tcp_stream(host, int(port))
            try:
                path = url.removeprefix(stack.url)
                await stalled.send_all(
                    (
                        f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\n"
                        f"Authorization: Bearer {token()}\r\nTus-Resumable: 1.0.0\r\n"
                        f"Upload-Offset: 0\r\nContent-Type: {OFFSET_STREAM}\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n"
                    ).encode()
                    + data[:300_000]
                )
                await trio.sleep(0.5)  # read by the server, not saved yet: the PATCH is open
                started = trio.current_time()
                offset = await tus.offset(url)
                assert offset == 300_000
                final = await tus.upload(url, data, MIB)
                assert trio.current_time() - started < 5
                assert final.headers["Upload-File-Id"]
                # The old PATCH got its answer: what it saved.
                answer = await stalled.receive_some(4096)
                assert answer.startswith(b"HTTP/1.1 204"), answer
                assert b"upload-offset: 300000" in answer.lower()
            finally:
                await stalled.aclose()
            result = (await tus.state(url)).json()["result"]
            assert sha256(await download(http, stack, result)) == sha256(data)


async def test_a_silent_client_gets_408_and_keeps_what_it_sent(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(20):  # the stack's client idle timeout is 2 s
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            url = await tus.new(MIB)
            host, port = stack.url.split("//")[1].split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            try:
                await stream.send_all(
                    (
                        f"PATCH {url.removeprefix(stack.url)} HTTP/1.1\r\nHost: {host}\r\n"
                        f"Authorization: Bearer {token()}\r\nTus-Resumable: 1.0.0\r\n"
                        f"Upload-Offset: 0\r\nContent-Type: {OFFSET_STREAM}\r\n"
                        f"Content-Length: {MIB}\r\n\r\n"
                    ).encode()
                    + b"s" * 100_000
                )
                answer = await stream.receive_some(4096)
            finally:
                await stream.aclose()
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"upload-offset: 100000" in answer.lower()
            assert await tus.offset(url) == 100_000


async def test_expired_uploads_are_removed_by_the_janitor(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(60):
        ingester = stack.start_ingester(
            "tus-expiry",
            INGESTER_TUS_EXPIRATION_S="1.5",
            INGESTER_TUS_JANITOR_INTERVAL_S="0.2",
        )
        try:
            async with httpx.AsyncClient(trust_env=False) as http:
                tus = Tus(http, ingester.url, token())
                url = await tus.new(100)
                patched = await tus.patch(url, 0, b"x" * 10)
                assert patched.status_code == 204
                path = data_file(stack, url, "tus-expiry")
                assert path.exists()
                took = await eventually(lambda: not path.exists(), timeout_s=10, interval_s=0.1)
                assert took >= 1.0
                assert (await tus.head(url)).status_code == 404
                assert (await tus.patch(url, 10, b"x")).status_code == 404
        finally:
            ingester.terminate()


async def test_the_next_upload_takes_over_a_finished_uploads_data_file(
    stack: Stack, token: TokenFactory
) -> None:
    """A stored upload's data file is kept, and the next upload writes over its pages: old
    bytes past the offset are never stored, through a cut connection and a resume."""
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            first = b"".join(random_chunks(5 * MIB, seed=41))
            url = await tus.new(len(first))
            await tus.upload(url, first, 2 * MIB)
            result = (await tus.state(url)).json()["result"]
            assert sha256(await download(http, stack, result)) == sha256(first)

            second = b"".join(random_chunks(4 * MIB + 5, seed=42))
            url = await tus.new(len(second))
            upload_id = url.rsplit("/", 1)[1]
            created = [
                json.loads(line)
                for line in stack.ingester.log_lines()
                if '"event": "tus_created"' in line and upload_id in line
            ]
            assert [line["reused_file"] for line in created] == [True]
            assert data_file(stack, url).stat().st_size == len(second)
            sent = 1_500_000
            await raw_patch_then_cut(url, token(), 0, len(second), second[:sent])

            def saved() -> bool:
                return any(
                    '"event": "tus_chunk_interrupted"' in line and upload_id in line
                    for line in stack.ingester.log_lines()
                )

            await eventually(saved, timeout_s=5)
            assert await tus.offset(url) == sent
            await tus.upload(url, second, MIB)
            result = (await tus.state(url)).json()["result"]
            assert sha256(await download(http, stack, result)) == sha256(second)


async def test_the_janitor_removes_a_stored_uploads_leftover_data_and_orphans(
    stack: Stack, token: TokenFactory
) -> None:
    """A process that dies between storing an upload and removing its data file leaves the
    file beside a `done` state, which lives on for its retention: the janitor removes such
    a file once it is past the orphans' grace, as it does a file with no state at all, and
    leaves a recent one (its completion may still be removing it)."""
    async with own_ingester(stack, "janitor", INGESTER_TUS_JANITOR_INTERVAL_S="0.2") as sweeping:
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False) as http:
                tus = Tus(http, sweeping.url, token())
                stored = []
                for _ in range(2):
                    url = await tus.new(10, metadata={"filename": "a.txt"})
                    assert (await tus.patch(url, 0, b"0123456789")).status_code == 204
                    stored.append(url)
                old, recent = (data_file(stack, url, "janitor") for url in stored)
                orphan = old.parent / ("f" * 32)
                past = time.time() - 400  # beyond the orphans' 300 s grace
                for path in (old, recent, orphan):
                    path.write_bytes(b"left over")
                for path in (old, orphan):
                    os.utime(path, (past, past))

                def swept() -> bool:
                    lines = sweeping.log_lines()
                    return any(
                        '"event": "tus_stored_data_removed"' in line and old.name in line
                        for line in lines
                    ) and any('"event": "tus_orphan"' in line for line in lines)

                await eventually(swept, timeout_s=10)
                assert not old.exists()
                assert not orphan.exists()
                assert recent.exists()
                # The stored uploads answer as before.
                for url in stored:
                    assert (await tus.state(url)).json()["result"]["file_id"]


async def test_a_clean_up_that_fails_after_the_store_leaves_the_upload_stored(
    stack: Stack, token: TokenFactory
) -> None:
    """Found by a review: removing the data file after a stored upload went through the
    completion's failure path, which set the upload back to `receiving`; the client's
    next final PATCH stored it again. The file system refuses here (the idle files'
    directory is a file): the upload stays stored, its file id answered once."""
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False) as http:
            tus = Tus(http, stack.url, token())
            data = b"".join(random_chunks(2 * MIB, seed=14))
            url = await tus.new(len(data))
            assert (await tus.patch(url, 0, data[:MIB])).status_code == 204
            reuse = data_file(stack, url).parent / ".reuse"
            kept = reuse.with_name(".reuse-kept")
            moved = reuse.exists()
            if moved:
                reuse.rename(kept)
            reuse.write_bytes(b"not a directory")
            try:
                final = await tus.patch(url, MIB, data[MIB:])
            finally:
                reuse.unlink()
                if moved:
                    kept.rename(reuse)
            assert final.status_code == 204, final.text
            state = (await tus.state(url)).json()
            assert state["result"]["file_id"] == final.headers["Upload-File-Id"]
            assert sha256(await download(http, stack, state["result"])) == sha256(data)
            # Sent again, the final PATCH gets the same file, not a second one.
            again = await tus.patch(url, MIB, data[MIB:])
            assert again.status_code == 204, again.text
            assert again.headers["Upload-File-Id"] == final.headers["Upload-File-Id"]


async def test_a_file_system_error_in_the_janitor_stops_neither_it_nor_the_service(
    stack: Stack, token: TokenFactory
) -> None:
    """Found by a review: the janitor caught only the service's own errors; an OSError from
    the spool (here the idle files' directory is a file) ended it, and with it the service
    nursery and every upload in it. It logs the error and tries again."""
    async with own_ingester(
        stack, "janitor-oserror", INGESTER_TUS_JANITOR_INTERVAL_S="0.2"
    ) as sweeping:
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False) as http:
                tus = Tus(http, sweeping.url, token())
                url = await tus.new(10)
                reuse = data_file(stack, url, "janitor-oserror").parent / ".reuse"
                if reuse.exists():
                    reuse.rename(reuse.with_name(".reuse-kept"))
                reuse.write_bytes(b"not a directory")

                def complained() -> bool:
                    return (
                        sum('"event": "tus_janitor"' in line for line in sweeping.log_lines()) >= 2
                    )

                await eventually(complained, timeout_s=10)  # twice: it went on after the first
                assert (await tus.patch(url, 0, b"0123456789")).status_code == 204
                assert (await tus.state(url)).json()["result"]["file_id"]
