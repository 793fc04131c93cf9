"""Attacks on resumable uploads (tus): bodies past the declared length, hoarding uploads, and
method override on safe methods."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.hostile.common import (
    OFFSET_STREAM,
    TUS_BASE,
    Spawn,
    Tus,
    assert_unharmed,
    error_code,
    tus_data_files,
)
from tests.support.client import MIB, AsyncBody, send_stream
from tests.support.processes import ManagedProcess

# Small caps, to reach them with a few requests.
CAP_UPLOADS = 3
CAP_BYTES = 3000
CAP_MAX_SIZE = 2000


@pytest.fixture(scope="module")
def plain(spawn: Spawn) -> ManagedProcess:
    """An ingester with the default limits."""
    return spawn("tus-plain")


@pytest.fixture(scope="module")
def capped(spawn: Spawn) -> ManagedProcess:
    return spawn(
        "tus-capped",
        INGESTER_TUS_MAX_UPLOADS_PER_USER=str(CAP_UPLOADS),
        INGESTER_TUS_MAX_BYTES_PER_USER=str(CAP_BYTES),
        INGESTER_TUS_MAX_SIZE=str(CAP_MAX_SIZE),
    )


def pieces(total: int, size: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield bytes([65 + (sent // size) % 26]) * n
        sent += n


async def send_body(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    headers: dict[str, str],
    body: list[bytes] | Iterator[bytes],
    framing: str,
) -> httpx.Response:
    """`body` framed by Content-Length (all at once) or chunked (piece by piece)."""
    headers = dict(headers)
    if framing == "content-length":
        raw = b"".join(body)
        headers["Content-Length"] = str(len(raw))
        return await send_stream(http, method, url, AsyncBody(iter([raw])), headers)
    headers["Transfer-Encoding"] = "chunked"
    return await send_stream(http, method, url, AsyncBody(iter(body)), headers)


# --- B1: a chunk past Upload-Length is refused whole, keeping nothing ------------------------


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_patch_past_the_upload_length_keeps_nothing(
    stack: Stack, plain: ManagedProcess, token: TokenFactory, framing: str
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            tus = Tus(http, plain.url, token(sub=f"overrun-{framing}"))
            url = await tus.new(10)
            headers = tus.headers(**{"Upload-Offset": "0", "Content-Type": OFFSET_STREAM})
            response = await send_body(http, "PATCH", url, headers, [b"a" * 10, b"b" * 5], framing)
            assert response.status_code == 413, response.text
            assert error_code(response) == "FILE_TOO_LARGE"
            assert await tus.offset(url) == 0
            # An empty PATCH at the length finds nothing to store.
            finish = await tus.patch(url, 10, b"")
            assert finish.status_code == 409, finish.text
            assert error_code(finish) == "UPLOAD_OFFSET_MISMATCH"
            assert (await tus.delete(url)).status_code == 204
        await assert_unharmed(stack, plain.url, before)


async def test_long_chunked_patch_past_the_length_takes_back_its_checkpoints(
    stack: Stack, plain: ManagedProcess, token: TokenFactory
) -> None:
    """A PATCH saves its progress every 32 MiB; one that then overruns is still refused
    whole: the offset goes back to where it began."""
    with trio.fail_after(60):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            tus = Tus(http, plain.url, token(sub="overrun-long"))
            url = await tus.new(40 * MIB)
            headers = tus.headers(**{"Upload-Offset": "0", "Content-Type": OFFSET_STREAM})
            response = await send_body(
                http, "PATCH", url, headers, pieces(41 * MIB, MIB), "chunked"
            )
            assert response.status_code == 413, response.text
            assert error_code(response) == "FILE_TOO_LARGE"
            assert response.headers["Upload-Offset"] == "0"
            assert await tus.offset(url) == 0
            assert (await tus.delete(url)).status_code == 204
        await assert_unharmed(stack, plain.url, before)


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_creation_with_upload_past_its_length_creates_nothing(
    stack: Stack, plain: ManagedProcess, token: TokenFactory, framing: str
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        data_before = tus_data_files(stack, "tus-plain")
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            tus = Tus(http, plain.url, token(sub=f"overrun-create-{framing}"))
            headers = tus.headers(**{"Upload-Length": "10", "Content-Type": OFFSET_STREAM})
            response = await send_body(
                http, "POST", plain.url + TUS_BASE, headers, [b"a" * 10, b"b" * 5], framing
            )
            assert response.status_code == 413, response.text
            assert error_code(response) == "FILE_TOO_LARGE"
            assert "Location" not in response.headers
        assert tus_data_files(stack, "tus-plain") == data_before
        await assert_unharmed(stack, plain.url, before)


# --- B2: per-user caps on open uploads and declared bytes ------------------------------------


async def test_one_user_cannot_hoard_open_uploads(
    stack: Stack, capped: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            tus = Tus(http, capped.url, token(sub="hoarder"))
            urls = [await tus.new(10) for _ in range(CAP_UPLOADS)]
            refused = await tus.create(10)
            assert refused.status_code == 429, refused.text
            assert error_code(refused) == "TOO_MANY_OPEN_UPLOADS"
            assert int(refused.headers["Retry-After"]) >= 1
            assert "Location" not in refused.headers
            # Per user: someone else is not affected.
            other = Tus(http, capped.url, token(sub="bystander"))
            bystander = await other.new(10)
            # Ending one of them (terminated, or stored) makes room again.
            assert (await tus.delete(urls[0])).status_code == 204
            again = await tus.new(10)
            for url in [*urls[1:], again]:
                assert (await tus.delete(url)).status_code == 204
            assert (await other.delete(bystander)).status_code == 204
        await assert_unharmed(stack, capped.url, before)


async def test_one_user_cannot_declare_unbounded_bytes(
    stack: Stack, capped: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            tus = Tus(http, capped.url, token(sub="declarer"))
            big = await tus.new(CAP_MAX_SIZE)
            refused = await tus.create(CAP_BYTES - CAP_MAX_SIZE + 1)
            assert refused.status_code == 429, refused.text
            assert error_code(refused) == "UPLOAD_QUOTA_EXCEEDED"
            assert int(refused.headers["Retry-After"]) >= 1
            fits = await tus.new(CAP_BYTES - CAP_MAX_SIZE)
            for url in (big, fits):
                assert (await tus.delete(url)).status_code == 204
        await assert_unharmed(stack, capped.url, before)


async def test_a_deferred_length_counts_as_the_largest_upload_until_declared(
    stack: Stack, capped: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            tus = Tus(http, capped.url, token(sub="deferrer"))
            deferred = await tus.new(None)
            refused = await tus.create(CAP_BYTES - CAP_MAX_SIZE + 1)
            assert refused.status_code == 429, refused.text
            assert error_code(refused) == "UPLOAD_QUOTA_EXCEEDED"
            # Declaring the length (a PATCH with Upload-Length) gives the rest back (a length
            # is never over the largest upload, so declaring can only shrink the count).
            declared = await tus.patch(deferred, 0, b"", **{"Upload-Length": "10"})
            assert declared.status_code == 204, declared.text
            big = await tus.new(CAP_MAX_SIZE)
            room = CAP_BYTES - CAP_MAX_SIZE - 10
            over = await tus.create(room + 1)
            assert over.status_code == 429, over.text
            assert error_code(over) == "UPLOAD_QUOTA_EXCEEDED"
            fits = await tus.new(room)
            for url in (deferred, big, fits):
                assert (await tus.delete(url)).status_code == 204
        await assert_unharmed(stack, capped.url, before)


# --- B6: X-HTTP-Method-Override only on POST ----------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_method_override_on_a_safe_method_is_ignored(
    stack: Stack, plain: ManagedProcess, token: TokenFactory, method: str
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            tus = Tus(http, plain.url, token(sub=f"override-{method}"))
            url = await tus.new(10)
            sneaky = await http.request(
                method, url, headers=tus.headers(**{"X-HTTP-Method-Override": "DELETE"})
            )
            assert sneaky.status_code == 200, sneaky.text
            # Still there: the override was not run.
            assert await tus.offset(url) == 0
            assert (await tus.delete(url)).status_code == 204
        await assert_unharmed(stack, plain.url, before)
