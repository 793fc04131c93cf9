"""Attacks by slowness: bodies sent a few bytes at a time to hold an upload slot (B3).

The ingester here has a minimum rate of 2000 bytes per 1 s window (production: 16 KiB per
60 s); the attacks trickle below it and must be cut within about one window, with the
slot, the memory budget and nothing else held."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.hostile.common import OFFSET_STREAM, Spawn, Tus, assert_unharmed, error_code
from tests.support.client import MultipartUpload, auth, post_upload, send_stream
from tests.support.metrics import metric
from tests.support.processes import ManagedProcess

MIN_RATE_BYTES = 2000
WINDOW_S = 1.0


@pytest.fixture(scope="module")
def paced(spawn: Spawn) -> ManagedProcess:
    return spawn(
        "paced",
        INGESTER_CLIENT_MIN_RATE_BYTES=str(MIN_RATE_BYTES),
        INGESTER_CLIENT_MIN_RATE_WINDOW_S=str(WINDOW_S),
        # One slot per user: a slot left held would refuse the next upload.
        INGESTER_MAX_UPLOADS_PER_USER="1",
        # Far beyond the test: only the rate can end the trickle in time.
        INGESTER_CLIENT_IDLE_TIMEOUT_S="60",
    )


class Trickle(httpx.AsyncByteStream):
    """`head`, then `piece` every `every_s` seconds, `count` times, then `tail`: a client
    that paces itself (the pacing is the attack, not a wait for the server)."""

    def __init__(
        self, head: bytes, piece: bytes, every_s: float, count: int, tail: bytes = b""
    ) -> None:
        self._parts: Iterator[bytes] = iter([head, *([piece] * count), tail])
        self._every_s = every_s
        self._first = True
        self.sent = 0

    def __aiter__(self) -> Trickle:
        return self

    async def __anext__(self) -> bytes:
        if not self._first:
            await trio.sleep(self._every_s)
        self._first = False
        try:
            part = next(self._parts)
        except StopIteration:
            raise StopAsyncIteration from None
        self.sent += len(part)
        return part


def multipart_trickle(every_s: float, piece: bytes, count: int) -> tuple[Trickle, str]:
    form = MultipartUpload([b""], filename="slow.bin")
    head, *_rest = form.parts()
    tail = f"\r\n--{form.boundary}--\r\n".encode()
    return Trickle(head, piece, every_s, count, tail), form.content_type


async def test_a_trickling_multipart_body_is_cut_and_frees_its_slot(
    stack: Stack, paced: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        # 10 bytes every 0.3 s: 33 bytes/s, for 15 s if nobody stops it.
        body, content_type = multipart_trickle(0.3, b"s" * 10, 50)
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            headers = auth(
                token(sub="trickler"),
                **{"Content-Type": content_type, "Transfer-Encoding": "chunked"},
            )
            started = trio.current_time()
            response = await send_stream(
                http, "POST", paced.url + "/api/v1/files/upload", body, headers
            )
            took = trio.current_time() - started
            assert response.status_code == 408, response.text
            assert error_code(response) == "CLIENT_TOO_SLOW"
            # Cut after its first window (the first window is a grace period), not later.
            assert WINDOW_S <= took < WINDOW_S + 3, took
            await assert_unharmed(stack, paced.url, before)
            # The slot is free: the same user (one slot) uploads at once.
            ok = await post_upload(http, paced.url, token(sub="trickler"), MultipartUpload([b"ok"]))
            assert ok.status_code == 201, ok.text
            text = (await http.get(paced.url + "/metrics")).text
            assert metric(text, "ingester_uploads_in_flight") == 0
            assert metric(text, "ingester_memory_budget_used_bytes") == 0


async def test_a_trickling_tus_patch_is_cut_and_keeps_what_arrived(
    stack: Stack, paced: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            tus = Tus(http, paced.url, token(sub="tus-trickler"))
            url = await tus.new(10_000)
            body = Trickle(b"t" * 100, b"t" * 10, 0.3, 50)
            headers = tus.headers(
                **{
                    "Upload-Offset": "0",
                    "Content-Type": OFFSET_STREAM,
                    "Transfer-Encoding": "chunked",
                }
            )
            started = trio.current_time()
            response = await send_stream(http, "PATCH", url, body, headers)
            took = trio.current_time() - started
            assert response.status_code == 408, response.text
            assert error_code(response) == "CLIENT_TOO_SLOW"
            assert WINDOW_S <= took < WINDOW_S + 3, took
            # What arrived is kept, as after any interrupted PATCH, and HEAD agrees.
            kept = int(response.headers["Upload-Offset"])
            assert 100 <= kept < 10_000
            assert await tus.offset(url) == kept
            assert (await tus.delete(url)).status_code == 204
        await assert_unharmed(stack, paced.url, before)


async def test_a_slow_but_steady_client_is_not_cut(
    stack: Stack, paced: ManagedProcess, token: TokenFactory
) -> None:
    """The control: twice the minimum rate, steadily, for a few windows, is stored."""
    with trio.fail_after(30):
        body, content_type = multipart_trickle(0.1, b"k" * 400, 25)
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            headers = auth(
                token(sub="steady"),
                **{"Content-Type": content_type, "Transfer-Encoding": "chunked"},
            )
            response = await send_stream(
                http, "POST", paced.url + "/api/v1/files/upload", body, headers
            )
            assert response.status_code == 201, response.text
            assert response.json()["file_size"] == 400 * 25
