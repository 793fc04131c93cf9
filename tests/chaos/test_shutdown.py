"""SIGTERM with uploads in flight: readiness turns 503 at once, new uploads are refused with
Retry-After, uploads that finish within the grace period succeed with their files intact,
the others (throttled clients) are cancelled and leave nothing behind, and the process exits
0 with no spool left."""

from __future__ import annotations

import signal
from typing import Final

import httpx
import trio

from tests.conftest import Stack, TokenFactory
from tests.support.chaos import (
    Ledger,
    PacedBody,
    assert_clear_error,
    assert_no_orphans,
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
