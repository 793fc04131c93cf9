"""A resumable upload whose Storage Element dies while the finished upload is stored: the
store fails over to the next element, replaying what the dead one had been given from the
upload's own data file (no second copy of the bytes is written), and the final PATCH still
answers 204 with the file intact on the other element and nothing left on the dead one."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Final

import httpx
import trio

from tests.conftest import TokenFactory
from tests.support.chaos import (
    assert_no_orphans,
    download_sha256,
    idle_tus_files,
    receiving,
    restart_element,
    serve_ingester,
    spool_files,
    start_elements,
)
from tests.support.client import MIB, AsyncBody, auth, random_chunks, send_stream
from tests.support.fixtures import KeyPair
from tests.support.metrics import metric

SIZE: Final = 64 * MIB
CHUNK: Final = 16 * MIB
ENV: Final = {
    "INGESTER_SE_STALL_TIMEOUT_S": "1.5",
    # Only a failure wakes the prober: the test decides when elements are seen down.
    "INGESTER_SE_PROBE_INTERVAL_S": "60",
    "INGESTER_UPLOAD_DEADLINE_S": "30",
}


def tus_headers(token: str, **extra: str) -> dict[str, str]:
    return auth(token, **{"Tus-Resumable": "1.0.0", **extra})


async def patch(
    http: httpx.AsyncClient, url: str, token: str, offset: int, data: bytes
) -> httpx.Response:
    headers = tus_headers(
        token,
        **{"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"},
    )
    headers["Content-Length"] = str(len(data))
    # Class-based: httpx's generator for `content=bytes` warns when a kill leaves it.
    return await send_stream(http, "PATCH", url, AsyncBody(iter([data])), headers)


async def test_element_killed_while_a_finished_upload_is_stored_fails_over_from_the_data_file(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        first, second = await start_elements(stack, tmp_path, keypair, 2)
        ingester = await serve_ingester(
            stack, tmp_path, keypair, [first.registry_entry(1), second.registry_entry(2)], ENV
        )
        data = b"".join(random_chunks(SIZE, seed=15))
        with trio.fail_after(90):
            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                created = await http.post(
                    ingester.url + "/api/v1/uploads",
                    headers=tus_headers(
                        token(),
                        **{"Upload-Length": str(SIZE), "Upload-Metadata": "filename YS5iaW4="},
                    ),
                )
                assert created.status_code == 201, created.text
                url = ingester.url + created.headers["Location"]
                for offset in range(0, SIZE - CHUNK, CHUNK):
                    sent = await patch(http, url, token(), offset, data[offset : offset + CHUNK])
                    assert sent.status_code == 204, sent.text
                answers: list[httpx.Response] = []
                async with trio.open_nursery() as nursery:

                    async def last_patch() -> None:
                        offset = SIZE - CHUNK
                        answers.append(await patch(http, url, token(), offset, data[offset:]))

                    nursery.start_soon(last_patch)
                    # Some MiB into the first element, then it dies.
                    await receiving(first, 8 * MIB)
                    first.kill()
                (final,) = answers
                assert final.status_code == 204, final.text
                assert final.headers["Upload-Storage-Element-Id"] == second.element_id
                file_id = final.headers["Upload-File-Id"]
                sha256, size = await download_sha256(http, second.url, file_id, token(), None)
                assert (sha256, size) == (hashlib.sha256(data).hexdigest(), SIZE)
                metrics = (await http.get(ingester.url + "/metrics")).text
        assert metric(metrics, "ingester_failovers_total", element_id=first.element_id) == 1
        # The replay came from the data file: the store wrote no copy of its own.
        assert metric(metrics, "ingester_spool_written_bytes_total") == 0
        # The data file is gone with the stored upload (kept, nameless, for the next one);
        # the dead element keeps nothing.
        assert [p for p in spool_files(ingester) if p.is_file()] == []
        assert [p.stat().st_size for p in idle_tus_files(ingester)] == [SIZE]
        first = await restart_element(first)
        await assert_no_orphans(
            [first, second], baseline={second.element_id: {f"*{file_id}*"}}, timeout_s=15
        )
