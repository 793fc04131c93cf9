"""`Idempotency-Key` on multipart uploads, against the real stack (the in-process store) and
against two ingesters sharing a redis-server (the shared store)."""

from __future__ import annotations

import base64
import hashlib
import uuid
from pathlib import Path

import httpx
import trio

from tests.conftest import Stack, TokenFactory
from tests.support.chaos import PacedBody, post_paced
from tests.support.client import MultipartUpload, post_upload
from tests.support.redis_server import RedisServer


def data_files(stack: Stack) -> set[Path]:
    return {p for p in stack.all_files() if p.name.endswith(".attr.json")}


async def test_a_repeat_gets_the_first_result_and_nothing_is_stored_twice(
    stack: Stack, token: TokenFactory
) -> None:
    key = {"Idempotency-Key": "order-4711-invoice"}
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            before = data_files(stack)
            first = await post_upload(
                http, stack.url, token(), MultipartUpload([b"invoice " * 5000]), headers=key
            )
            assert first.status_code == 201, first.text
            assert "Idempotent-Replayed" not in first.headers
            after_first = data_files(stack)
            assert len(after_first - before) == 1
            # The same file again (another boundary, even streamed differently).
            again = await post_upload(
                http,
                stack.url,
                token(),
                MultipartUpload([b"invoice " * 2500, b"invoice " * 2500]),
                headers=key,
                stream=False,
            )
            assert again.status_code == 201, again.text
            assert again.headers["Idempotent-Replayed"] == "true"
            assert again.json() == first.json()
            assert again.headers["Location"] == first.headers["Location"]
            assert data_files(stack) == after_first

            # Another file under the same key: refused, nothing stored.
            other = await post_upload(
                http, stack.url, token(), MultipartUpload([b"something else"]), headers=key
            )
            assert other.status_code == 422, other.text
            assert other.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
            # Same bytes, another name: another file too.
            renamed = await post_upload(
                http,
                stack.url,
                token(),
                MultipartUpload([b"invoice " * 5000], filename="other.bin"),
                headers=key,
            )
            assert renamed.status_code == 422
            assert data_files(stack) == after_first

            # Keys are per user: bob's "order-4711-invoice" is his own.
            bob = await post_upload(
                http,
                stack.url,
                token(sub="bob"),
                MultipartUpload([b"invoice " * 5000]),
                headers=key,
            )
            assert bob.status_code == 201
            assert "Idempotent-Replayed" not in bob.headers
            assert bob.json()["file_id"] != first.json()["file_id"]


async def test_a_repeat_while_the_first_runs_is_409(stack: Stack, token: TokenFactory) -> None:
    key = "slow-one"
    body = MultipartUpload([b"s" * 400_000])
    paced = PacedBody(body, hold_at=100_000)
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            results: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:

                async def first() -> None:
                    results.append(
                        await post_paced(
                            http, stack.url, token(), body, paced, **{"Idempotency-Key": key}
                        )
                    )

                nursery.start_soon(first)
                await paced.holding.wait()
                repeat = await post_upload(
                    http,
                    stack.url,
                    token(),
                    MultipartUpload([b"s" * 400_000]),
                    headers={"Idempotency-Key": key},
                )
                assert repeat.status_code == 409, repeat.text
                assert repeat.json()["error"]["code"] == "IDEMPOTENCY_IN_PROGRESS"
                paced.release()
            assert results[0].status_code == 201, results[0].text
            # Done now: the repeat is answered from the first.
            late = await post_upload(
                http,
                stack.url,
                token(),
                MultipartUpload([b"s" * 400_000]),
                headers={"Idempotency-Key": key},
            )
            assert late.status_code == 201
            assert late.json()["file_id"] == results[0].json()["file_id"]


async def test_a_failed_first_request_lets_the_key_go(stack: Stack, token: TokenFactory) -> None:
    payload = b"digest me " * 1000
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    right = base64.b64encode(hashlib.sha256(payload).digest()).decode()
    key = "retry-after-400"
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            before = data_files(stack)
            failed = await post_upload(
                http,
                stack.url,
                token(),
                MultipartUpload([payload]),
                headers={"Idempotency-Key": key, "Content-Digest": f"sha-256=:{wrong}:"},
            )
            assert failed.status_code == 400
            assert failed.json()["error"]["code"] == "DIGEST_MISMATCH"
            ok = await post_upload(
                http,
                stack.url,
                token(),
                MultipartUpload([payload]),
                headers={"Idempotency-Key": key, "Content-Digest": f"sha-256=:{right}:"},
            )
            assert ok.status_code == 201, ok.text
            assert "Idempotent-Replayed" not in ok.headers
            assert len(data_files(stack) - before) == 1


async def test_a_malformed_key_is_a_clear_400(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            before = stack.all_files()
            for bad in ("x" * 256, "has space"):
                response = await post_upload(
                    http,
                    stack.url,
                    token(),
                    MultipartUpload([b"k"]),
                    headers={"Idempotency-Key": bad},
                )
                assert response.status_code == 400
                assert response.json()["error"]["code"] == "INVALID_FIELD"
                assert "Idempotency-Key" in response.json()["error"]["message"]
            await stack.settled(before)


async def test_replicas_sharing_redis_answer_a_repeat_from_the_first(
    stack: Stack, token: TokenFactory, redis_server: RedisServer
) -> None:
    with trio.fail_after(60):
        one, two = await trio.to_thread.run_sync(
            lambda: (
                stack.start_ingester("idem-one", INGESTER_REDIS_URL=redis_server.url),
                stack.start_ingester("idem-two", INGESTER_REDIS_URL=redis_server.url),
            )
        )
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
                headers = {"Idempotency-Key": "shared-key"}
                before = data_files(stack)
                first = await post_upload(
                    http, one.url, token(), MultipartUpload([b"r" * 70_000]), headers=headers
                )
                assert first.status_code == 201, first.text
                again = await post_upload(
                    http, two.url, token(), MultipartUpload([b"r" * 70_000]), headers=headers
                )
                assert again.status_code == 201
                assert again.headers["Idempotent-Replayed"] == "true"
                assert again.json()["file_id"] == first.json()["file_id"]
                assert len(data_files(stack) - before) == 1
                # Redis holds the key hashed, never as sent.
                keys = redis_server.client().keys("ingester:idem:*")
                assert len(keys) == 1
                assert b"shared-key" not in keys[0]
        finally:
            one.terminate()
            two.terminate()


async def test_a_key_whose_store_is_away_is_a_503_to_retry_and_nothing_is_stored(
    stack: Stack, token: TokenFactory, redis_server: RedisServer
) -> None:
    # Run unchecked, a retry during a Redis failover could store a file its first attempt
    # already stored (the first's result waits in Redis). So: 503 with Retry-After, and the
    # same request succeeds once Redis is back.
    with trio.fail_after(60):
        proc = await trio.to_thread.run_sync(
            lambda: stack.start_ingester(
                "idem-away", INGESTER_REDIS_URL=redis_server.url, INGESTER_REDIS_TIMEOUT_S="0.5"
            )
        )
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
                headers = {"Idempotency-Key": "while-away"}
                before = data_files(stack)
                redis_server.kill()
                refused = await post_upload(
                    http, proc.url, token(), MultipartUpload([b"a" * 5000]), headers=headers
                )
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "IDEMPOTENCY_STORE_UNAVAILABLE"
                assert int(refused.headers["Retry-After"]) >= 1
                assert data_files(stack) == before
                await trio.to_thread.run_sync(redis_server.start)
                stored = await post_upload(
                    http, proc.url, token(), MultipartUpload([b"a" * 5000]), headers=headers
                )
                assert stored.status_code == 201, stored.text
                assert len(data_files(stack) - before) == 1
        finally:
            proc.terminate()


async def test_one_upload_id_sent_twice_at_once_runs_once(
    stack: Stack, token: TokenFactory, redis_server: RedisServer
) -> None:
    """The same X-Upload-ID in two requests at once, each with its own Idempotency-Key (so
    each waits on Redis before its upload starts): one is stored, the other is 409
    UPLOAD_ID_IN_USE (found by a review: both ran under one id, sharing its progress record
    and saga, and the loser got 503 after its whole body). Ten rounds, fresh ids."""
    with trio.fail_after(90):
        ingester = await trio.to_thread.run_sync(
            lambda: stack.start_ingester("idem-upload-id", INGESTER_REDIS_URL=redis_server.url)
        )
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
                for round_ in range(10):
                    upload_id = str(uuid.uuid4())
                    statuses: list[int] = []
                    before = data_files(stack)

                    async def send(
                        n: int, upload_id: str = upload_id, statuses: list[int] = statuses
                    ) -> None:
                        response = await post_upload(
                            http,
                            ingester.url,
                            token(),
                            MultipartUpload([bytes([n]) * 300_000]),
                            headers={
                                "X-Upload-ID": upload_id,
                                "Idempotency-Key": f"k{n}-{upload_id}",
                            },
                        )
                        statuses.append(response.status_code)
                        if response.status_code == 409:
                            assert response.json()["error"]["code"] == "UPLOAD_ID_IN_USE"

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(send, 1)
                        nursery.start_soon(send, 2)
                    assert sorted(statuses) == [201, 409], (round_, statuses)
                    assert len(data_files(stack) - before) == 1
        finally:
            ingester.terminate()
