"""Two ingester processes sharing a redis-server (started here on a free port) and the spool
directory, as replicas behind a load balancer: a tus upload may go to either, and a client
that reconnects to the other replica resumes instead of waiting for a dead connection."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.integration.test_tus import OFFSET_STREAM, Tus, download
from tests.support.client import MIB, random_chunks
from tests.support.processes import ManagedProcess
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually_async

# Short enough that a killed replica's lock runs out quickly in the test.
LOCK_TTL_S = "2"


@dataclass
class Replicas:
    a: ManagedProcess
    b: ManagedProcess
    spool: str


@pytest.fixture
def replicas(stack: Stack, redis_server: RedisServer) -> Iterator[Replicas]:
    spool = stack.root / f"shared-spool-{redis_server.port}"
    env = {
        "INGESTER_REDIS_URL": redis_server.url,
        "INGESTER_SPOOL_DIR": str(spool),
        "INGESTER_TUS_LOCK_TTL_S": LOCK_TTL_S,
        "INGESTER_TUS_LOCK_WAIT_S": "8",
    }
    started: list[ManagedProcess] = []
    try:
        started.append(stack.start_ingester(f"replica-a-{redis_server.port}", **env))
        started.append(stack.start_ingester(f"replica-b-{redis_server.port}", **env))
        yield Replicas(started[0], started[1], str(spool))
    finally:
        for proc in started:
            proc.terminate()


async def open_patch(url: str, token: str, offset: int, declared: int) -> trio.SocketStream:
    """A PATCH whose headers and no body were sent: the caller sends what it likes."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        (
            f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
            f"Content-Type: {OFFSET_STREAM}\r\nContent-Length: {declared}\r\n\r\n"
        ).encode()
    )
    return stream


def on(replica: ManagedProcess, url: str) -> str:
    """The same upload URL on another replica (what a load balancer does)."""
    return replica.url + "/api/v1/uploads/" + url.rsplit("/", 1)[-1]


async def test_creations_sent_at_once_with_one_key_make_one_upload_on_the_quota(
    stack: Stack, token: TokenFactory, redis_server: RedisServer
) -> None:
    """Found by a review: two creations with the same Idempotency-Key at once (a client's
    retry of one that timed out, on the other replica) both reserved quota under the one
    id, and the loser's release erased the winner's reservation: the upload then counted
    against no cap. The key's lock is held from before the look now."""
    env = {"INGESTER_REDIS_URL": redis_server.url, "INGESTER_TUS_MAX_UPLOADS_PER_USER": "2"}
    started = [
        await trio.to_thread.run_sync(partial(stack.start_ingester, f"capped-{n}", **env))
        for n in ("a", "b")
    ]
    try:
        with trio.fail_after(60):
            async with httpx.AsyncClient(trust_env=False) as http:
                via = [Tus(http, proc.url, token(sub="carol")) for proc in started]
                key = {"Idempotency-Key": "same-at-once"}
                answers: list[httpx.Response] = []

                async def create(tus: Tus) -> None:
                    while True:
                        answer = await tus.create(10, metadata={"filename": "x"}, headers=key)
                        if answer.status_code != 423:  # the other one holds the key
                            answers.append(answer)
                            return
                        await trio.sleep(0.05)

                async with trio.open_nursery() as nursery:
                    for n in range(8):
                        nursery.start_soon(create, via[n % 2])
                assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers]
                assert len({a.headers["Location"] for a in answers}) == 1
                # The keyed upload holds one of carol's two places: one more, then no more.
                assert (await via[0].create(10, metadata={"filename": "y"})).status_code == 201
                refused = await via[1].create(10, metadata={"filename": "z"})
                assert refused.status_code == 429, refused.text
    finally:
        for proc in started:
            proc.terminate()


async def test_patches_alternate_and_a_killed_replica_leaves_a_resumable_upload(
    stack: Stack, token: TokenFactory, replicas: Replicas
) -> None:
    with trio.fail_after(90):
        data = b"".join(random_chunks(6 * MIB + 321, seed=31))
        async with httpx.AsyncClient(trust_env=False) as http:
            via_a = Tus(http, replicas.a.url, token())
            via_b = Tus(http, replicas.b.url, token())
            url = await via_a.new(len(data), metadata={"filename": "replicated.bin"})
            offset = 0
            for turn in range(4):
                tus = via_a if turn % 2 == 0 else via_b
                target = on(replicas.a if turn % 2 == 0 else replicas.b, url)
                assert await tus.offset(target) == offset
                response = await tus.patch(target, offset, data[offset : offset + MIB])
                assert response.status_code == 204, response.text
                offset = int(response.headers["Upload-Offset"])
            assert offset == 4 * MIB
            # A PATCH in flight on A when A dies: what it held was never acknowledged.
            stream = await open_patch(on(replicas.a, url), token(), offset, len(data) - offset)
            try:
                await stream.send_all(data[offset : offset + 512 * 1024])
                await trio.sleep(0.5)
                replicas.a.kill()
            finally:
                await stream.aclose()
            # B answers once the dead replica's lock has run out, with the saved offset.
            started = trio.current_time()
            resumed_at = await via_b.offset(on(replicas.b, url))
            assert resumed_at == offset
            assert trio.current_time() - started < float(LOCK_TTL_S) + 3
            final = await via_b.upload(on(replicas.b, url), data, 2 * MIB)
            result = (await via_b.state(on(replicas.b, url))).json()["result"]
            assert final.headers["Upload-File-Id"] == result["file_id"]
            stored = await download(http, stack, result)
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_a_patch_to_another_replica_makes_the_holder_let_go(
    stack: Stack, token: TokenFactory, replicas: Replicas
) -> None:
    with trio.fail_after(60):
        data = b"".join(random_chunks(2 * MIB, seed=32))
        held = 700_000
        async with httpx.AsyncClient(trust_env=False) as http:
            via_b = Tus(http, replicas.b.url, token())
            url = await via_b.new(len(data))
            # A's client sent `held` bytes of a larger body and went quiet (a dead link).
            stream = await open_patch(on(replicas.a, url), token(), 0, len(data))
            try:
                await stream.send_all(data[:held])
                await trio.sleep(0.5)
                # The client, reconnected to B, sends from where it got: A lets go and
                # saves, B takes the upload and goes on. No 423, no lock time-out.
                started = trio.current_time()
                response = await via_b.patch(on(replicas.b, url), held, data[held : held + MIB])
                took = trio.current_time() - started
                assert response.status_code == 204, response.text
                assert response.headers["Upload-Offset"] == str(held + MIB)
                assert took < float(LOCK_TTL_S)
                answer = await stream.receive_some(4096)
                assert answer.startswith(b"HTTP/1.1 204"), answer
                assert f"upload-offset: {held}".encode() in answer.lower()
            finally:
                await stream.aclose()
            # A stale offset (the client did not know what A had) is a quick 409 with the
            # right one, not a 423.
            stale = await via_b.patch(on(replicas.a, url), 0, data[:10])
            assert stale.status_code == 409
            assert stale.headers["Upload-Offset"] == str(held + MIB)
            final = await via_b.upload(on(replicas.a, url), data, MIB)
            result = (await via_b.state(on(replicas.b, url))).json()["result"]
            assert final.headers["Upload-File-Id"] == result["file_id"]
            stored = await download(http, stack, result)
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_an_upload_left_completing_by_a_dead_replica_is_stored_by_the_next_request(
    stack: Stack, token: TokenFactory, replicas: Replicas, redis_server: RedisServer
) -> None:
    """A replica saved `completing` (every byte in) and died before storing: no one holds
    the lock, so the client's final PATCH, sent again to another replica, stores it."""
    with trio.fail_after(60):
        data = b"".join(random_chunks(MIB, seed=33))
        async with httpx.AsyncClient(trust_env=False) as http:
            via_b = Tus(http, replicas.b.url, token())
            # What the dead replica left: the last chunk on disk, the state `completing`.
            url = await left_unstored(via_b, replicas, redis_server, data, "completing")
            head = await via_b.head(on(replicas.a, url))
            assert head.headers["Upload-Offset"] == str(len(data))
            final = await via_b.patch(on(replicas.a, url), len(data), b"")
            assert final.status_code == 204, final.text
            result = (await via_b.state(url)).json()["result"]
            assert final.headers["Upload-File-Id"] == result["file_id"]
            stored = await download(http, stack, result)
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("phase", ["completing", "receiving"])
async def test_a_head_alone_stores_an_upload_left_with_every_byte_and_no_store(
    stack: Stack, token: TokenFactory, replicas: Replicas, redis_server: RedisServer, phase: str
) -> None:
    """What a dead replica (or a lost reply, or a client gone before its answer) may leave:
    every byte in, no store running, `completing` or still `receiving`. tus clients HEAD,
    read the full offset and send nothing more: that HEAD must be enough to get it stored."""
    with trio.fail_after(60):
        data = b"".join(random_chunks(MIB, seed=34))
        async with httpx.AsyncClient(trust_env=False) as http:
            via_b = Tus(http, replicas.b.url, token())
            url = await left_unstored(via_b, replicas, redis_server, data, phase)
            head = await via_b.head(on(replicas.a, url))
            assert head.status_code == 200, head.text
            assert head.headers["Upload-Offset"] == str(len(data))

            async def stored() -> bool:
                return bool((await via_b.state(url)).json()["state"] == "done")

            await eventually_async(stored, timeout_s=30)
            result = (await via_b.state(url)).json()["result"]
            stored_bytes = await download(http, stack, result)
        assert hashlib.sha256(stored_bytes).hexdigest() == hashlib.sha256(data).hexdigest()


async def left_unstored(
    tus: Tus, replicas: Replicas, redis_server: RedisServer, data: bytes, phase: str
) -> str:
    """An upload of `data` whose bytes but the last 1000 went in through `tus`, then left as
    a replica that died would leave it: the last chunk on disk, the state in `phase` at the
    length, no lock held. Its URL."""
    url = await tus.new(len(data))
    last = len(data) - 1000
    assert (await tus.patch(url, 0, data[:last])).status_code == 204
    await trio.to_thread.run_sync(
        leave_completing,
        redis_server,
        Path(replicas.spool),
        url.rsplit("/", 1)[-1],
        data,
        last,
        phase,
    )
    return url


async def test_a_head_alone_stores_a_final_upload_left_completing(
    stack: Stack, token: TokenFactory, replicas: Replicas, redis_server: RedisServer
) -> None:
    """Found by a review: a final (concatenated) upload is stored at its creation, and when
    its replica died mid-store it stayed `completing`, never stored, holding its partial
    uploads, until it expired: a `PATCH` to a final upload is refused, and a `HEAD` restarted
    stores of other uploads only. Its state is made here as such a replica leaves it, beside
    partial uploads of the same bytes: a `HEAD` on the other replica stores it."""
    with trio.fail_after(60):
        pieces = [b"".join(random_chunks(MIB + i, seed=40 + i)) for i in range(2)]
        async with httpx.AsyncClient(trust_env=False) as http:
            via_a = Tus(http, replicas.a.url, token())

            async def partials() -> list[str]:
                urls = []
                for piece in pieces:
                    url = await via_a.new(len(piece), headers={"Upload-Concat": "partial"})
                    await via_a.upload(url, piece, 512 * 1024)
                    urls.append(url)
                return urls

            # A final stored the usual way shows what its state looks like.
            done_urls = await partials()
            final = await via_a.create(
                None, headers={"Upload-Concat": "final;" + " ".join(done_urls)}
            )
            assert final.status_code == 201, final.text
            left_urls = await partials()
            left_id = "f" * 32
            await trio.to_thread.run_sync(
                leave_final_completing,
                redis_server,
                via_a.url(final.headers["Location"]).rsplit("/", 1)[-1],
                left_id,
                [u.rsplit("/", 1)[-1] for u in left_urls],
            )
            left_url = replicas.b.url + "/api/v1/uploads/" + left_id
            head = await via_a.head(left_url)
            assert head.status_code == 200, head.text

            async def stored() -> bool:
                return bool((await via_a.state(left_url)).json()["state"] == "done")

            await eventually_async(stored, timeout_s=30)
            result = (await via_a.state(left_url)).json()["result"]
            stored_bytes = await download(http, stack, result)
        assert (
            hashlib.sha256(stored_bytes).hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()
        )


def leave_final_completing(
    server: RedisServer, model_id: str, upload_id: str, parts: list[str]
) -> None:
    """A final upload of `parts`, `completing`, as a replica that died storing it leaves
    it (made from a stored final's state, `model_id`)."""
    client = server.client()
    try:
        state = json.loads(client.get(f"ingester:tus:{model_id}") or b"{}")
        state.update(
            id=upload_id, phase="completing", parts=parts, result=None, attempts=0,
            concat_header="final;" + " ".join(f"/api/v1/uploads/{p}" for p in parts),
        )  # fmt: skip
        client.set(f"ingester:tus:{upload_id}", json.dumps(state), ex=3600)
    finally:
        client.close()


def leave_completing(
    server: RedisServer,
    spool: Path,
    upload_id: str,
    data: bytes,
    last: int,
    phase: str = "completing",
) -> None:
    # At the offset, as the replica would have (the file may be an idle one, longer).
    with open(spool / "tus" / upload_id, "r+b") as data_file:
        data_file.seek(last)
        data_file.write(data[last:])
    client = server.client()
    try:
        key = f"ingester:tus:{upload_id}"
        state = json.loads(client.get(key) or b"{}")
        state.update(offset=len(data), phase=phase, offset_before=last)
        client.set(key, json.dumps(state), keepttl=True)
    finally:
        client.close()


async def test_redis_frozen_is_a_clear_503_and_the_upload_resumes_after(
    stack: Stack, token: TokenFactory, replicas: Replicas, redis_server: RedisServer
) -> None:
    """Redis away: every tus request is a 503 `TUS_STORE_UNAVAILABLE` with `Retry-After`,
    nothing is lost, and the same upload goes on once Redis is back."""
    with trio.fail_after(90):
        data = b"".join(random_chunks(3 * MIB + 17, seed=33))
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            tus = Tus(http, replicas.a.url, token())
            url = on(replicas.a, await tus.new(len(data)))
            first = await tus.patch(url, 0, data[:MIB])
            assert first.status_code == 204, first.text
            redis_server.pause()
            try:
                refused = [
                    await tus.head(url),
                    await tus.patch(url, MIB, data[MIB : 2 * MIB]),
                    await tus.create(len(data)),
                ]
            finally:
                redis_server.resume()
            for response in refused:
                assert response.status_code == 503, response.text
                assert int(response.headers["Retry-After"]) > 0
                if response.request.method != "HEAD":
                    assert response.json()["error"]["code"] == "TUS_STORE_UNAVAILABLE"
            # The refused PATCH changed nothing: the upload goes on from the first chunk.
            assert await tus.offset(url) == MIB
            await tus.upload(url, data, MIB)
            result = (await tus.state(url)).json()["result"]
            stored = await download(http, stack, result)
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()
