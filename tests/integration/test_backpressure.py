"""Backpressure end to end: a Storage Element that stops reading stops the client, not the
ingester's memory (`ingester.http.body`: Quart's own body buffer has no limit)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import trio

from tests.conftest import TokenFactory
from tests.support.chaos import download_sha256, resources, serve_ingester
from tests.support.client import MIB, MultipartUpload, post_upload, random_chunks
from tests.support.fixtures import KeyPair
from tests.support.metrics import read_metric
from tests.support.processes import IngesterProcess, StorageElementProcess
from tests.support.waiting import eventually, eventually_async, until_still

BODY_BYTES = 768 * MIB
# Between the client's last sent byte and the element's file, when all stopped: socket
# buffers both ways, hypercorn's app queue, the body buffer and the pipeline's channels.
IN_FLIGHT_MAX = 96 * MIB
RSS_MAX = 250 * MIB


def tmp_bytes(element: StorageElementProcess) -> int:
    return sum(p.stat().st_size for p in element.tmp_dir.glob("*") if p.is_file())


async def element_to_freeze(
    stack: contextlib.AsyncExitStack,
    tmp_path: Path,
    keypair: KeyPair,
    env: dict[str, str] | None = None,
) -> tuple[StorageElementProcess, IngesterProcess]:
    """An element a test will stop, and an ingester over it that waits for it: the element
    stays frozen well past the test's look, so no stall verdict."""
    element = await stack.enter_async_context(
        StorageElementProcess(
            tmp_path, mode="edit", public_key=keypair.public_path, element_id="se-slow"
        )
    )
    ingester = await serve_ingester(
        stack,
        tmp_path,
        keypair,
        [element.registry_entry()],
        env={
            "INGESTER_SE_STALL_TIMEOUT_S": "300",
            "INGESTER_SE_PROBE_INTERVAL_S": "600",
            **(env or {}),
        },
    )
    return element, ingester


async def test_a_stalled_element_stops_the_client_not_our_memory(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        element, ingester = await element_to_freeze(stack, tmp_path, keypair)
        body = MultipartUpload(random_chunks(BODY_BYTES, seed=23), fields=[("compress", "false")])
        answer: list[httpx.Response] = []
        with trio.fail_after(120):
            async with (
                httpx.AsyncClient(trust_env=False, timeout=120) as http,
                trio.open_nursery() as nursery,
            ):

                async def upload() -> None:
                    answer.append(await post_upload(http, ingester.url, token(), body))

                nursery.start_soon(upload)
                await eventually(lambda: tmp_bytes(element) >= 16 * MIB, timeout_s=30)
                element.stop_signal()
                try:
                    # The client's sending stops once every buffer on the way is full.
                    sent = await until_still(lambda: body.size, interval_s=0.25, samples=6)
                    landed = tmp_bytes(element)
                    rss = resources(ingester.pid).rss_bytes
                    assert sent < BODY_BYTES
                    assert sent - landed < IN_FLIGHT_MAX, (sent / MIB, landed / MIB)
                    assert rss < RSS_MAX, rss / MIB
                finally:
                    element.cont_signal()
            response = answer[0]
            assert response.status_code == 201, response.text
            assert response.json()["checksum"] == body.sha256
            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                stored = await download_sha256(
                    http, element.url, response.json()["file_id"], token(), None
                )
            assert stored == (body.sha256, BODY_BYTES)


# The receive share's total in the next test, and the floor every connection may still read.
RECEIVE_TOTAL = 2 * MIB
FLOOR_READ = 64 * 1024


async def test_received_bytes_stay_within_the_receive_share_and_are_all_given_back(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """One upload starts alone (big reads), seven join it, the element stops: the
    ingester counts what it holds of their bodies (near the share's total: past it, each
    connection reads the floor's size), and once they are stored, one more is refused
    mid-body and another's client goes away, none of it is counted any more; a count that
    leaked would shrink every later read."""
    async with contextlib.AsyncExitStack() as stack:
        element, ingester = await element_to_freeze(
            stack,
            tmp_path,
            keypair,
            {
                "INGESTER_RECEIVE_MEMORY_BYTES": str(RECEIVE_TOTAL),
                "INGESTER_MEMORY_BUDGET_BYTES": str(4 * MIB),
                "INGESTER_MAX_FILE_SIZE": str(64 * MIB),
            },
        )
        bodies = [
            MultipartUpload(random_chunks(48 * MIB, seed=40 + n), fields=[("compress", "false")])
            for n in range(8)
        ]
        answers: list[httpx.Response] = []

        async def held() -> float:
            return await read_metric(ingester.url, "ingester_receive_held_bytes")

        with trio.fail_after(120):
            async with (
                httpx.AsyncClient(trust_env=False, timeout=120) as http,
                trio.open_nursery() as nursery,
            ):

                async def upload(body: MultipartUpload) -> None:
                    answers.append(await post_upload(http, ingester.url, token(), body))

                nursery.start_soon(upload, bodies[0])
                await eventually(lambda: tmp_bytes(element) >= 8 * MIB, timeout_s=30)
                for body in bodies[1:]:
                    nursery.start_soon(upload, body)
                await eventually(lambda: all(b.size > MIB for b in bodies), timeout_s=30)
                element.stop_signal()
                try:
                    await until_still(
                        lambda: sum(b.size for b in bodies), interval_s=0.25, samples=6
                    )
                    now = await held()
                    assert 0 < now <= RECEIVE_TOTAL + len(bodies) * 4 * FLOOR_READ, now / MIB
                finally:
                    element.cont_signal()
            assert [a.status_code for a in answers] == [201] * len(bodies)
            assert sorted(a.json()["checksum"] for a in answers) == sorted(b.sha256 for b in bodies)
            # Refused mid-body: what it sent past the limit is read and dropped.
            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                too_big = MultipartUpload(random_chunks(66 * MIB, seed=49))
                refused = await post_upload(http, ingester.url, token(), too_big)
            assert refused.status_code == 413, refused.text
            assert refused.json()["error"]["code"] == "FILE_TOO_LARGE"

            async def none_held() -> bool:
                return await held() == 0

            await eventually_async(none_held, timeout_s=10)

            # A client that goes away while the ingester holds part of its body. (The
            # ingester learns it at its next read: not while the frozen element keeps it
            # from reading.) What the connection held goes with it.
            element.stop_signal()
            try:
                async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                    gone = MultipartUpload(
                        random_chunks(48 * MIB, seed=50), fields=[("compress", "false")]
                    )
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(post_upload, http, ingester.url, token(), gone)
                        await until_still(lambda: gone.size, interval_s=0.25, samples=6)
                        assert await held() > 0
                        nursery.cancel_scope.cancel()
            finally:
                element.cont_signal()
            await eventually_async(none_held, timeout_s=10)
