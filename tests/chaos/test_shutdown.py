"""SIGTERM with uploads in flight: readiness turns 503 at once, new uploads are refused with
Retry-After, uploads that finish within the grace period succeed with their files intact,
the others (throttled clients) are cancelled and leave nothing behind, and the process exits
0 with no spool left."""

from __future__ import annotations

import hashlib
import signal
from typing import Final

import httpx
import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.hostile.common import Tus
from tests.support.chaos import (
    Ledger,
    PacedBody,
    assert_clear_error,
    assert_no_orphans,
    download_sha256,
    post_paced,
    snapshot,
    spool_files,
    upload_of,
)
from tests.support.client import MIB, MultipartUpload, post_upload, random_chunks
from tests.support.metrics import metric

GRACE_S: Final = 4.0
# Each (name, size, bytes per second, body): the quick ones end about 2.5 s after the signal,
# inside the grace period; the slow ones would need about 40 s.
QUICK: Final = [
    ("quick-plain", MIB, 400_000, None),
    ("quick-large", 24 * MIB, 10 * MIB, None),
    ("quick-brotli", 2 * MIB, 800_000, "brotli"),
]
SLOW: Final = [
    ("slow-plain", 2 * MIB, 50_000, None),
    # The file before the fields: spooled as well, and the spool must go too.
    ("slow-file-first", 2 * MIB, 50_000, "file_first"),
]


def body_of(size: int, seed: int, kind: str | None) -> MultipartUpload:
    if kind == "file_first":
        return MultipartUpload(
            random_chunks(size, seed=seed),
            fields=[("retention_policy", "temporary"), ("compress", "false")],
            file_first=True,
        )
    return upload_of(size, seed=seed, compress=kind)


async def test_sigterm_drains_then_cancels_and_exits_cleanly(
    stack: Stack, token: TokenFactory
) -> None:
    proc = await trio.to_thread.run_sync(
        lambda: stack.start_ingester(
            "draining",
            INGESTER_SHUTDOWN_GRACE_S=str(GRACE_S),
            INGESTER_CLIENT_IDLE_TIMEOUT_S="30",
        )
    )
    before = snapshot(stack.elements)
    ledger = Ledger()
    answers: dict[str, httpx.Response | Exception] = {}

    async def upload(name: str, body: MultipartUpload, rate: float) -> None:
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                response = await post_paced(
                    http, proc.url, token(sub=name), body, PacedBody(body, bytes_per_s=rate)
                )
        except httpx.HTTPError as exc:
            answers[name] = exc
        else:
            answers[name] = response
            ledger.add(response, body)

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            for seed, (name, size, rate, kind) in enumerate(QUICK + SLOW):
                nursery.start_soon(upload, name, body_of(size, seed, kind), rate)
            # Every upload is running when the signal comes (under load they may take a
            # while to start; with none in flight the drain would end at once).
            async with httpx.AsyncClient(trust_env=False) as http:
                while True:
                    text = (await http.get(proc.url + "/metrics")).text
                    if metric(text, "ingester_uploads_in_flight") == len(QUICK + SLOW):
                        break
                    await trio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            signalled = trio.current_time()
            async with httpx.AsyncClient(trust_env=False) as http:
                ready = await http.get(proc.url + "/health/ready")
                refused = await post_upload(
                    http, proc.url, token(sub="late"), MultipartUpload([b"l"])
                )
            assert ready.status_code == 503
            assert "shutting down" in ready.json()["reasons"]
            assert refused.status_code == 503
            assert assert_clear_error(refused) == "SHUTTING_DOWN"
            assert trio.current_time() - signalled < 1.0
        exit_code = await proc.exited()
        stopped_after = trio.current_time() - signalled

    for name, *_ in QUICK:
        quick = answers[name]
        assert isinstance(quick, httpx.Response), (name, quick)
        assert quick.status_code == 201, quick.text
    assert len(ledger.stored) == len(QUICK)
    for name, *_ in SLOW:
        # Cancelled at the end of the grace period: the connection closes without a 201.
        slow = answers[name]
        assert not (isinstance(slow, httpx.Response) and slow.status_code == 201), name
    assert exit_code == 0, proc.log_tail()
    # The grace period plus hypercorn's own short grace for what is left.
    assert GRACE_S <= stopped_after < GRACE_S + 7.0
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        await ledger.assert_intact(http, token())
    # Only the quick uploads' files are new: the slow ones left nothing, not even a
    # temporary file, once the elements have settled.
    await assert_no_orphans(stack.elements, ledger, baseline=before)
    assert spool_files(proc) == []


async def test_an_idle_replica_keeps_listening_for_the_drain_delay(
    stack: Stack, token: TokenFactory
) -> None:
    # Behind a load balancer: with nothing in flight it would stop at once, before the
    # balancer's checks saw readiness 503. With INGESTER_DRAIN_DELAY_S it answers (503,
    # with the reason) until the delay is over, then exits 0 well within the grace period.
    delay_s = 2.0
    proc = await trio.to_thread.run_sync(
        lambda: stack.start_ingester(
            "delayed", INGESTER_SHUTDOWN_GRACE_S="20", INGESTER_DRAIN_DELAY_S=str(delay_s)
        )
    )
    popen = proc.popen
    assert popen is not None
    with trio.fail_after(30):
        popen.send_signal(signal.SIGTERM)
        signalled = trio.current_time()
        answered_after: list[float] = []
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            while True:
                try:
                    ready = await http.get(proc.url + "/health/ready")
                except httpx.TransportError:
                    break  # the port closed: the delay is over
                assert ready.status_code == 503
                assert "shutting down" in ready.json()["reasons"]
                answered_after.append(trio.current_time() - signalled)
                await trio.sleep(0.1)
        exit_code = await trio.to_thread.run_sync(popen.wait)
        stopped_after = trio.current_time() - signalled
    assert exit_code == 0, proc.log_tail()
    # Still answering most of the delay after the signal, and stopped soon after it.
    assert max(answered_after) >= delay_s - 0.5, answered_after
    assert stopped_after < delay_s + 5.0


class _Paced(httpx.AsyncByteStream):
    """`data` in 64 KiB pieces, `pause_s` apart; `under_way` is set after the fourth. A class,
    not an async generator: one cut short by the server would be reported at collection."""

    def __init__(self, data: bytes, pause_s: float) -> None:
        self._data = data
        self._pause_s = pause_s
        self._at = 0
        self.under_way = trio.Event()

    def __aiter__(self) -> _Paced:
        return self

    async def __anext__(self) -> bytes:
        if self._at >= len(self._data):
            raise StopAsyncIteration
        if self._at:
            await trio.sleep(self._pause_s)
        piece = self._data[self._at : self._at + 64 * 1024]
        self._at += len(piece)
        if self._at >= 4 * 64 * 1024:
            self.under_way.set()
        return piece


@pytest.mark.parametrize("window_s", ["0", "3"], ids=["stored-at-the-end", "pipelined"])
async def test_sigterm_lets_a_resumable_upload_s_last_patch_finish_and_be_stored(
    stack: Stack, token: TokenFactory, window_s: str
) -> None:
    """Found by a review: the drain waited for admitted uploads only, and a tus `PATCH` is
    admitted at its last byte; with no multipart upload in flight, a `PATCH` under way got
    hypercorn's 2 s, not the grace, and its store, begun during the drain, was refused. Now
    the grace covers `PATCH`es under way, and the store of an upload whose bytes are all in
    runs within it. (A pipelined store is admitted with its first `PATCH`: that one was
    covered already.)"""
    proc = await trio.to_thread.run_sync(
        lambda: stack.start_ingester(
            "draining-tus",
            INGESTER_SHUTDOWN_GRACE_S="10",
            INGESTER_CLIENT_IDLE_TIMEOUT_S="30",
            INGESTER_TUS_PIPELINE_WINDOW_S=window_s,
        )
    )
    data = b"".join(random_chunks(2 * MIB, seed=77))
    with trio.fail_after(40):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            tus = Tus(http, proc.url, token())
            url = await tus.new(len(data))
            answer: list[httpx.Response] = []
            body = _Paced(data, pause_s=0.1)

            async def last_patch() -> None:
                # The whole upload in one PATCH, about 3.2 s at this pace.
                request = http.build_request(
                    "PATCH", url,
                    headers=tus.headers(**{
                        "Upload-Offset": "0",
                        "Content-Type": "application/offset+octet-stream",
                        "Content-Length": str(len(data)),
                    }),
                )  # fmt: skip
                request.stream = body
                answer.append(await http.send(request))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(last_patch)
                await body.under_way.wait()  # the PATCH is being received
                proc.send_signal(signal.SIGTERM)
                signalled = trio.current_time()
            exit_code = await proc.exited()
            patched = answer[0]
            assert patched.status_code == 204, patched.text
            assert patched.headers["Upload-Offset"] == str(len(data))
            file_id = patched.headers["Upload-File-Id"]
            (element,) = [
                se for se in stack.elements
                if se.element_id == patched.headers["Upload-Storage-Element-Id"]
            ]  # fmt: skip
            assert await download_sha256(http, element.url, file_id, token(), None) == (
                hashlib.sha256(data).hexdigest(),
                len(data),
            )
    assert exit_code == 0, proc.log_tail()
    assert trio.current_time() - signalled > 2.0  # it waited for the PATCH, not 2 s
