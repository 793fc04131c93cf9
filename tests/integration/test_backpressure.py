"""Backpressure end to end: a Storage Element that stops reading stops the client, not the
ingester's memory (`ingester.http.body`: Quart's own body buffer has no limit)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from tests.conftest import TokenFactory
from tests.support.chaos import download_sha256, resources, serve_ingester
from tests.support.client import MIB, MultipartUpload, post_upload, random_chunks
from tests.support.fixtures import KeyPair
from tests.support.processes import StorageElementProcess
from tests.support.waiting import eventually

BODY_BYTES = 768 * MIB
# Between the client's last sent byte and the element's file, when all stopped: socket
# buffers both ways, hypercorn's app queue, the body buffer and the pipeline's channels.
IN_FLIGHT_MAX = 96 * MIB
RSS_MAX = 250 * MIB


def tmp_bytes(element: StorageElementProcess) -> int:
    return sum(p.stat().st_size for p in element.tmp_dir.glob("*") if p.is_file())


async def until_still(read: Callable[[], int], *, interval_s: float, samples: int) -> int:
    """Poll `read` until it gives the same value `samples` times in a row; that value."""
    last, same = -1, 0
    while same < samples:
        value = read()
        same = same + 1 if value == last else 0
        last = value
        await trio.sleep(interval_s)
    return last


async def test_a_stalled_element_stops_the_client_not_our_memory(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    async with contextlib.AsyncExitStack() as stack:
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
            # The element stays frozen well past the test's look: no stall verdict.
            env={"INGESTER_SE_STALL_TIMEOUT_S": "300", "INGESTER_SE_PROBE_INTERVAL_S": "600"},
        )
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
