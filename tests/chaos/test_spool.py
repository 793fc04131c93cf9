"""The spool: one copy of an upload's original bytes serves both a failover and a late field
that changes the plan; small uploads keep it in memory and never touch the disk.

Each test checks what a client and an operator would: the stored file's checksum (read back
from the element that the 201 names, decompressed when stored compressed), nothing left on
any element or in the spool directory, and what `ingester_spool_written_bytes_total` says
went to disk.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from tests.conftest import TokenFactory
from tests.support.chaos import (
    Ledger,
    assert_intact,
    assert_no_orphans,
    receiving,
    restart_element,
    serve_ingester,
    spool_files,
    start_elements,
    upload_of,
)
from tests.support.client import MIB, MultipartUpload, post_upload, random_chunks
from tests.support.fixtures import KeyPair
from tests.support.metrics import metric

# The default in-memory threshold (INGESTER_SPOOL_MEMORY_BYTES).
MEMORY_LIMIT: Final = MIB
ENV: Final = {
    "INGESTER_SE_STALL_TIMEOUT_S": "2",
    "INGESTER_SE_PROBE_INTERVAL_S": "60",
    "INGESTER_UPLOAD_DEADLINE_S": "60",
}


async def spool_written(http: httpx.AsyncClient, url: str) -> float:
    text = (await http.get(url + "/metrics")).text
    return metric(text, "ingester_spool_written_bytes_total")


@pytest.mark.parametrize("algorithm", ["brotli", "gzip"])
async def test_failover_after_compression_re_encodes_from_the_original_bytes(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory, algorithm: str
) -> None:
    """The element receiving a compressed upload is killed mid-stream: the next element
    gets the whole file compressed again from the spool's original bytes (a new
    compressor), so what it stores decompresses to exactly what was sent."""
    async with contextlib.AsyncExitStack() as stack:
        first, second = await start_elements(stack, tmp_path, keypair, 2)
        ingester = await serve_ingester(
            stack, tmp_path, keypair, [first.registry_entry(1), second.registry_entry(2)], ENV
        )
        body = upload_of(96 * MIB, seed=3, compress=algorithm)
        ledger = Ledger()
        with trio.fail_after(120):
            async with (
                httpx.AsyncClient(trust_env=False, timeout=90) as http,
                trio.open_nursery() as nursery,
            ):
                answered = trio.Event()

                async def upload() -> None:
                    ledger.add(await post_upload(http, ingester.url, token(), body), body)
                    answered.set()

                nursery.start_soon(upload)
                # Compressed bytes have reached the first element; then it dies.
                await receiving(first, 256 * 1024)
                first.kill()
                await answered.wait()
            (stored,) = ledger.stored
            assert stored.element_id == second.element_id
            assert stored.compression == algorithm
            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                await assert_intact(http, stored, token())
                text = (await http.get(ingester.url + "/metrics")).text
            assert metric(text, "ingester_failovers_total", element_id=first.element_id) == 1
            first = await restart_element(first)
            await assert_no_orphans([first, second], ledger)
            assert spool_files(ingester) == []


@pytest.mark.parametrize(
    ("size", "on_disk"),
    [(MEMORY_LIMIT // 2, False), (24 * MIB + 3, True)],
    ids=["in-memory", "on-disk"],
)
async def test_a_late_field_replays_the_spool_to_the_element_it_chose(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory, size: int, on_disk: bool
) -> None:
    """The file part first, then `retention_policy=permanent`: the pass already streaming
    to the edit element is abandoned and the spool goes to the rw element. The file is
    intact there, nothing is left on the edit element, and the copy went to disk only
    past the in-memory threshold (exactly once)."""
    async with contextlib.AsyncExitStack() as stack:
        (edit,) = await start_elements(stack, tmp_path, keypair, 1, mode="edit", prefix="edit")
        (rw,) = await start_elements(stack, tmp_path, keypair, 1, mode="rw", prefix="rw")
        ingester = await serve_ingester(
            stack, tmp_path, keypair, [edit.registry_entry(), rw.registry_entry()], ENV
        )
        body = MultipartUpload(
            random_chunks(size, seed=size),
            fields=[("retention_policy", "permanent"), ("compress", "false")],
            file_first=True,
        )
        ledger = Ledger()
        with trio.fail_after(60):
            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                before = await spool_written(http, ingester.url)
                response = await post_upload(http, ingester.url, token(), body)
                stored = ledger.add(response, body)
                assert stored is not None, response.text
                assert stored.element_id == rw.element_id
                assert response.json()["retention_policy"] == "permanent"
                await assert_intact(http, stored, token())
                written = await spool_written(http, ingester.url) - before
        assert written == (size if on_disk else 0)
        await assert_no_orphans([edit, rw], ledger)
        assert spool_files(ingester) == []


async def test_small_uploads_keep_their_copy_in_memory(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """With the failover copy on (the default), uploads up to the in-memory threshold write
    nothing to the spool; one past it writes its bytes once, whatever the field order."""
    async with contextlib.AsyncExitStack() as stack:
        (element,) = await start_elements(stack, tmp_path, keypair, 1)
        ingester = await serve_ingester(stack, tmp_path, keypair, [element.registry_entry()], ENV)
        ledger = Ledger()
        with trio.fail_after(60):
            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                before = await spool_written(http, ingester.url)
                for n, size in enumerate((0, 1, 4096, MEMORY_LIMIT)):
                    body = upload_of(size, seed=n)
                    assert ledger.add(await post_upload(http, ingester.url, token(), body), body)
                    assert await spool_written(http, ingester.url) == before, size
                large = MultipartUpload(random_chunks(8 * MIB, seed=9), fields=[])
                assert ledger.add(await post_upload(http, ingester.url, token(), large), large)
                assert await spool_written(http, ingester.url) == before + 8 * MIB
                await ledger.assert_intact(http, token())
        assert spool_files(ingester) == []
