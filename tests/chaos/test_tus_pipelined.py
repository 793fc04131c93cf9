"""The pipelined store of resumable uploads: while PATCHes keep coming to one replica, the
bytes go on to a Storage Element as they arrive; the final PATCH only finishes that request.
What a client checks: the stored checksum equals the sent one, one 204 with the file's id;
what an operator checks: `ingester_tus_streams_total` says which path stored it, and nothing
is left on any element when a stream is given up (a pause past the window, the next PATCH
on another replica, an element killed under it) or when the upload falls back to being
stored from its data file."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Final

import httpx
import trio

from tests.conftest import Stack, TokenFactory
from tests.support.chaos import (
    assert_no_orphans,
    download_sha256,
    receiving,
    restart_element,
    serve_ingester,
    snapshot,
    start_elements,
    temporary_sizes,
)
from tests.support.client import MIB, AsyncBody, auth, random_chunks, send_stream
from tests.support.fixtures import KeyPair
from tests.support.metrics import metric
from tests.support.processes import ManagedProcess
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually, eventually_async, until_still

CHUNK: Final = 8 * MIB
ENV: Final = {
    "INGESTER_SE_STALL_TIMEOUT_S": "1.5",
    # Only a failure wakes the prober: the test decides when elements are seen down.
    "INGESTER_SE_PROBE_INTERVAL_S": "60",
    "INGESTER_UPLOAD_DEADLINE_S": "60",
}
# A short window, for the tests that wait for it to pass; a long one for those whose
# stream must survive the test's own waits on a loaded machine.
SHORT_WINDOW: Final = {**ENV, "INGESTER_TUS_PIPELINE_WINDOW_S": "0.5"}
LONG_WINDOW: Final = {**ENV, "INGESTER_TUS_PIPELINE_WINDOW_S": "30"}


class Client:
    """A tus client over httpx, one method per request."""

    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self.http = http
        self.token = token

    def headers(self, **extra: str) -> dict[str, str]:
        return auth(self.token, **{"Tus-Resumable": "1.0.0", **extra})

    async def create(self, ingester: ManagedProcess, size: int) -> str:
        created = await self.http.post(
            ingester.url + "/api/v1/uploads",
            headers=self.headers(
                **{"Upload-Length": str(size), "Upload-Metadata": "filename cC5iaW4="}
            ),
        )
        assert created.status_code == 201, created.text
        return str(created.headers["Location"])

    async def patch(
        self, ingester: ManagedProcess, location: str, data: bytes, offset: int
    ) -> httpx.Response:
        headers = self.headers(
            **{"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
        )
        piece = data[offset : offset + CHUNK]
        headers["Content-Length"] = str(len(piece))
        # Class-based: httpx's generator for `content=bytes` warns when a kill leaves it.
        return await send_stream(
            self.http, "PATCH", ingester.url + location, AsyncBody(iter([piece])), headers
        )

    async def send(
        self, ingester: ManagedProcess, location: str, data: bytes, start: int, end: int
    ) -> None:
        """The chunks from `start` to `end` (not the last one), each answered 204."""
        for offset in range(start, end, CHUNK):
            answer = await self.patch(ingester, location, data, offset)
            assert answer.status_code == 204, answer.text


async def streams(http: httpx.AsyncClient, ingester: ManagedProcess, outcome: str) -> float:
    text = (await http.get(ingester.url + "/metrics")).text
    return metric(text, "ingester_tus_streams_total", outcome=outcome)


async def until_streams(
    http: httpx.AsyncClient,
    ingester: ManagedProcess,
    outcome: str,
    count: int,
    timeout_s: float = 30,
) -> None:
    with trio.fail_after(timeout_s):
        while True:
            if await streams(http, ingester, outcome) >= count:
                return
            await trio.sleep(0.05)


async def assert_stored(
    http: httpx.AsyncClient, final: httpx.Response, element_url: str, data: bytes, token: str
) -> str:
    assert final.status_code == 204, final.text
    file_id = final.headers["Upload-File-Id"]
    sha256, size = await download_sha256(http, element_url, file_id, token, None)
    assert (sha256, size) == (hashlib.sha256(data).hexdigest(), len(data))
    return str(file_id)


async def test_back_to_back_patches_are_stored_while_they_arrive(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """The element has the bytes before the last PATCH is sent; the final PATCH finishes the
    stream (no second pass, no spool written), and the file is intact."""
    async with contextlib.AsyncExitStack() as stack:
        (element,) = await start_elements(stack, tmp_path, keypair, 1)
        ingester = await serve_ingester(
            stack, tmp_path, keypair, [element.registry_entry()], LONG_WINDOW
        )
        data = b"".join(random_chunks(3 * CHUNK + 12_345, seed=151))
        with trio.fail_after(60):
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                client = Client(http, token())
                location = await client.create(ingester, len(data))
                await client.send(ingester, location, data, 0, 3 * CHUNK)
                # Streamed already: the element is writing what the PATCHes brought.
                await receiving(element, 2 * CHUNK)
                final = await client.patch(ingester, location, data, 3 * CHUNK)
                file_id = await assert_stored(http, final, element.url, data, token())
                assert final.headers["Upload-Storage-Element-Id"] == element.element_id
                assert await streams(http, ingester, "stored") == 1
                assert await streams(http, ingester, "abandoned") == 0
                text = (await http.get(ingester.url + "/metrics")).text
                assert metric(text, "ingester_spool_written_bytes_total") == 0
                # The result is the upload's, as for a store at completion.
                state = (await http.get(ingester.url + location, headers=auth(token()))).json()
                assert state["state"] == "done"
                assert state["result"]["file_id"] == file_id
                assert state["result"]["upload_id"] == location.rsplit("/", 1)[-1]
                # Hashed as the stream read the data file: the checksum the client checks.
                assert state["result"]["checksum"] == hashlib.sha256(data).hexdigest()
        await assert_no_orphans([element], baseline={element.element_id: {f"*{file_id}*"}})


async def test_an_element_killed_mid_stream_fails_over_and_leaves_nothing(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        first, second = await start_elements(stack, tmp_path, keypair, 2)
        ingester = await serve_ingester(
            stack,
            tmp_path,
            keypair,
            [first.registry_entry(1), second.registry_entry(2)],
            LONG_WINDOW,
        )
        data = b"".join(random_chunks(4 * CHUNK, seed=152))
        with trio.fail_after(60):
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                client = Client(http, token())
                location = await client.create(ingester, len(data))
                await client.send(ingester, location, data, 0, 2 * CHUNK)
                await receiving(first, CHUNK)
                first.kill()
                await client.send(ingester, location, data, 2 * CHUNK, 3 * CHUNK)
                final = await client.patch(ingester, location, data, 3 * CHUNK)
                file_id = await assert_stored(http, final, second.url, data, token())
                assert final.headers["Upload-Storage-Element-Id"] == second.element_id
                text = (await http.get(ingester.url + "/metrics")).text
                assert metric(text, "ingester_failovers_total", element_id=first.element_id) == 1
                # The same stream went on to the next element, replaying from the data file.
                assert await streams(http, ingester, "stored") == 1
                assert metric(text, "ingester_spool_written_bytes_total") == 0
                state = (await http.get(ingester.url + location, headers=auth(token()))).json()
                assert state["result"]["checksum"] == hashlib.sha256(data).hexdigest()
        first = await restart_element(first)
        await assert_no_orphans(
            [first, second], baseline={second.element_id: {f"*{file_id}*"}}, timeout_s=15
        )


async def test_a_pause_longer_than_the_window_abandons_the_stream(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """The element's request is dropped (its temporary file goes); the next PATCH starts
    another stream, which reads what the data file holds first."""
    async with contextlib.AsyncExitStack() as stack:
        (element,) = await start_elements(stack, tmp_path, keypair, 1)
        ingester = await serve_ingester(
            stack, tmp_path, keypair, [element.registry_entry()], SHORT_WINDOW
        )
        data = b"".join(random_chunks(2 * CHUNK, seed=153))
        with trio.fail_after(60):
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                client = Client(http, token())
                location = await client.create(ingester, len(data))
                await client.send(ingester, location, data, 0, CHUNK)
                await receiving(element, 1)
                # The client pauses: the window passes, the stream is given up.
                await until_streams(http, ingester, "abandoned", 1)
                await eventually(lambda: temporary_sizes(element) == [], timeout_s=10)
                assert await client_offset(client, ingester, location) == CHUNK
                final = await client.patch(ingester, location, data, CHUNK)
                file_id = await assert_stored(http, final, element.url, data, token())
                assert await streams(http, ingester, "abandoned") == 1
                assert await streams(http, ingester, "stored") == 1
        await assert_no_orphans([element], baseline={element.element_id: {f"*{file_id}*"}})


async def test_an_upload_that_pauses_too_often_is_stored_from_its_data_file(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """The fallback: after two abandoned streams no third starts, and the completion stores
    the upload from its data file, as without pipelining."""
    async with contextlib.AsyncExitStack() as stack:
        (element,) = await start_elements(stack, tmp_path, keypair, 1)
        ingester = await serve_ingester(
            stack, tmp_path, keypair, [element.registry_entry()], SHORT_WINDOW
        )
        data = b"".join(random_chunks(3 * CHUNK, seed=154))
        with trio.fail_after(60):
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                client = Client(http, token())
                location = await client.create(ingester, len(data))
                for pause in (1, 2):
                    await client.send(ingester, location, data, (pause - 1) * CHUNK, pause * CHUNK)
                    await until_streams(http, ingester, "abandoned", pause)
                final = await client.patch(ingester, location, data, 2 * CHUNK)
                file_id = await assert_stored(http, final, element.url, data, token())
                assert await streams(http, ingester, "abandoned") == 2
                assert await streams(http, ingester, "stored") == 0
        await assert_no_orphans([element], baseline={element.element_id: {f"*{file_id}*"}})


async def test_the_next_patch_on_another_replica_abandons_the_stream(
    stack: Stack, token: TokenFactory, redis_server: RedisServer
) -> None:
    """Replica A streams; the next PATCH goes to B (a load balancer's choice), which stores
    the upload; A gives its stream up and its element request leaves nothing."""
    spool = stack.root / f"pipelined-spool-{redis_server.port}"
    env = {
        "INGESTER_REDIS_URL": redis_server.url,
        "INGESTER_SPOOL_DIR": str(spool),
        "INGESTER_TUS_PIPELINE_WINDOW_S": "1",
    }
    before = snapshot(stack.elements)
    started: list[ManagedProcess] = []
    try:
        a = await trio.to_thread.run_sync(lambda: stack.start_ingester("pipelined-a", **env))
        started.append(a)
        b = await trio.to_thread.run_sync(lambda: stack.start_ingester("pipelined-b", **env))
        started.append(b)
        data = b"".join(random_chunks(2 * CHUNK + 777, seed=155))
        with trio.fail_after(120):
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                client = Client(http, token())
                location = await client.create(a, len(data))
                await client.send(a, location, data, 0, 2 * CHUNK)
                await receiving(stack.se_edit, 1)
                final = await client.patch(b, location, data, 2 * CHUNK)
                file_id = await assert_stored(http, final, stack.se_edit.url, data, token())
                await until_streams(http, a, "abandoned", 1)
                assert await streams(http, a, "stored") == 0
        expected = {key: set(files) for key, files in before.items()}
        expected[stack.se_edit.element_id].add(f"*{file_id}*")
        await assert_no_orphans(stack.elements, baseline=expected)
    finally:
        for proc in started:
            await trio.to_thread.run_sync(proc.terminate)


async def client_offset(client: Client, ingester: ManagedProcess, location: str) -> int:
    head = await client.http.head(ingester.url + location, headers=client.headers())
    assert head.status_code == 200, head.headers
    return int(head.headers["Upload-Offset"])


def socket_buffers() -> int:
    """The most a loopback connection's two kernel buffers hold (tcp_wmem's and tcp_rmem's
    largest sizes) on this machine."""
    most = 0
    for name in ("tcp_wmem", "tcp_rmem"):
        most += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
    return most


async def test_a_client_faster_than_the_element_waits_during_the_upload_not_after(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """The element stops taking bytes mid-upload: the client's PATCHes stop too, once the
    data file is INGESTER_TUS_PIPELINE_LAG_BYTES ahead of the stream (plus what is in
    flight), instead of filling the data file while the final PATCH's wait grows with the
    whole lag. The element resumes: the upload ends, stored by the same stream, intact."""
    lag = 4 * MIB
    env = {
        **LONG_WINDOW,
        "INGESTER_SE_STALL_TIMEOUT_S": "300",
        "INGESTER_TUS_PIPELINE_LAG_BYTES": str(lag),
    }
    async with contextlib.AsyncExitStack() as stack:
        (element,) = await start_elements(stack, tmp_path, keypair, 1)
        ingester = await serve_ingester(stack, tmp_path, keypair, [element.registry_entry()], env)
        data = b"".join(random_chunks(16 * CHUNK, seed=156))
        with trio.fail_after(90):
            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                client = Client(http, token())
                location = await client.create(ingester, len(data))
                data_file = ingester.spool_dir / "tus" / location.rsplit("/", 1)[-1]
                await client.send(ingester, location, data, 0, CHUNK)
                await receiving(element, CHUNK // 2)
                element.stop_signal()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(client.send, ingester, location, data, CHUNK, 15 * CHUNK)
                        written = await until_still(
                            lambda: data_file.stat().st_size, interval_s=0.25, samples=6
                        )
                        took = max(temporary_sizes(element))
                        # Ahead of the element by the slack, a batch, what the pipeline and
                        # the frozen element hold (a few MiB), and the socket buffers between
                        # them: not by the whole upload.
                        ahead = lag + 8 * MIB + socket_buffers()
                        assert written - took <= ahead, (written, took, ahead)
                        assert written < 15 * CHUNK
                        element.cont_signal()
                finally:
                    element.cont_signal()
                final = await client.patch(ingester, location, data, 15 * CHUNK)
                await assert_stored(http, final, element.url, data, token())
                assert await streams(http, ingester, "stored") == 1


async def test_a_last_chunk_sent_whole_then_closed_is_kept_whole_and_stored(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    """The client sends its last chunk whole and closes at once, without reading the answer,
    while the ingester is behind (its stream waits for a frozen element). What the server
    had received and the PATCH not yet read must be kept (found in review: it was dropped
    with the cancelled PATCH, the offset stopped short of the length, and an upload every
    byte of which had arrived was never stored)."""
    env = {
        **LONG_WINDOW,
        "INGESTER_SE_STALL_TIMEOUT_S": "300",
        "INGESTER_TUS_PIPELINE_LAG_BYTES": "0",
    }
    async with contextlib.AsyncExitStack() as stack:
        (element,) = await start_elements(stack, tmp_path, keypair, 1)
        ingester = await serve_ingester(stack, tmp_path, keypair, [element.registry_entry()], env)
        data = b"".join(random_chunks(3 * CHUNK, seed=157))
        with trio.fail_after(90):
            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                client = Client(http, token())
                location = await client.create(ingester, len(data))
                data_file = ingester.spool_dir / "tus" / location.rsplit("/", 1)[-1]
                await client.send(ingester, location, data, 0, CHUNK)
                await receiving(element, CHUNK // 2)
                element.stop_signal()
                host, port = ingester.url.removeprefix("http://").rsplit(":", 1)
                rest = data[CHUNK:]
                head = (
                    f"PATCH {location} HTTP/1.1\r\nHost: {host}\r\n"
                    f"Authorization: Bearer {client.token}\r\nTus-Resumable: 1.0.0\r\n"
                    f"Upload-Offset: {CHUNK}\r\n"
                    "Content-Type: application/offset+octet-stream\r\n"
                    f"Content-Length: {len(rest)}\r\n\r\n"
                ).encode()
                raw = await trio.open_tcp_stream(host, int(port))
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(raw.send_all, head + rest)
                        # The PATCH waits for the frozen stream; its body piles up unread.
                        await until_still(
                            lambda: data_file.stat().st_size, interval_s=0.25, samples=4
                        )
                        element.cont_signal()
                finally:
                    element.cont_signal()
                await raw.aclose()  # every byte sent, the answer never read

                async def stored() -> bool:
                    state = await http.get(ingester.url + location, headers=client.headers())
                    return bool(state.json()["state"] == "done")

                await eventually_async(stored, timeout_s=60)
                state = (await http.get(ingester.url + location, headers=client.headers())).json()
                result = state["result"]
                assert result["checksum"] == hashlib.sha256(data).hexdigest()
                sha256, size = await download_sha256(
                    http, element.url, result["file_id"], token(), None
                )
                assert (sha256, size) == (hashlib.sha256(data).hexdigest(), len(data))
