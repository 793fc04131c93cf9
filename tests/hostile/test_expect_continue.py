"""`Expect: 100-continue`: a client that asks before sending its body is refused before it
sends a byte of it. curl asks for every body over 1 MiB, so a big upload with an expired
token, too large a `Content-Length` or the wrong content type used to cost its whole
transfer (hypercorn said `100 Continue` as soon as the head was parsed, before any check);
now the `100` goes out when the handler first reads the body, and a refusal before that
closes the connection at once, with nothing to drain."""

from __future__ import annotations

import hashlib
import json

import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.hostile.common import RawResponse, closed_by_server, connect, read_response
from tests.support.client import MIB, MultipartUpload, random_chunks

LARGE = 512 * MIB


def upload_head(
    token: str, body: MultipartUpload, length: int, *, content_type: str | None = None
) -> bytes:
    return (
        "POST /api/v1/files/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\n"
        f"Content-Type: {content_type or body.content_type}\r\n"
        f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()


async def refused_before_the_body(url: str, head: bytes) -> RawResponse:
    """Send `head` only; the answer must be final (no `100`), and the connection closed."""
    stream = await connect(url)
    async with stream:
        await stream.send_all(head)
        response = await read_response(stream)
        assert response.status != 100, "100 Continue before the request was checked"
        assert response.headers.get("connection") == "close"
        assert await closed_by_server(stream, within_s=2)
    return response


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("bad_token", 401, "UNAUTHORIZED"),
        ("too_large", 413, "FILE_TOO_LARGE"),
        ("not_a_form", 415, "UNSUPPORTED_MEDIA_TYPE"),
    ],
)
async def test_a_refusal_comes_before_the_body_is_asked_for(
    stack: Stack, token: TokenFactory, case: str, status: int, code: str
) -> None:
    body = MultipartUpload([b"x"])
    tokens = {"bad_token": "not-a-token"}
    lengths = {"too_large": 1 << 50}
    types = {"not_a_form": "application/octet-stream"}
    head = upload_head(
        tokens.get(case, token()),
        body,
        lengths.get(case, LARGE),
        content_type=types.get(case),
    )
    with trio.fail_after(10):
        before = trio.current_time()
        response = await refused_before_the_body(stack.url, head)
        assert response.status == status, response
        assert response.json_code() == code
        # At once: nothing was waited for (no lingering close for a body never asked for).
        assert trio.current_time() - before < 1.5


async def test_an_accepted_upload_is_told_to_continue_and_stored_whole(
    stack: Stack, token: TokenFactory
) -> None:
    data = b"".join(random_chunks(3 * MIB + 7, seed=41))
    body = MultipartUpload([data])
    payload = b"".join(body.parts())
    with trio.fail_after(30):
        stream = await connect(stack.url)
        async with stream:
            await stream.send_all(upload_head(token(), body, len(payload)))
            interim = await read_response(stream)
            assert interim.status == 100
            await stream.send_all(payload)
            response = await read_response(stream)
    assert response.status == 201, response
    result = json.loads(response.body)
    assert result["checksum"] == hashlib.sha256(data).hexdigest()
    assert result["file_size"] == len(data)
