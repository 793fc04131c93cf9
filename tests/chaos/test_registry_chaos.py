"""The Storage Element registry in Redis changing or going away while uploads run: uploads
go on with the last known registry, a change takes effect within a second of its pub/sub
message, and every upload still ends 201 with its file intact and nothing else stored."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from tests.chaos.conftest import storage_elements
from tests.conftest import TokenFactory
from tests.support.chaos import (
    Traffic,
    assert_no_orphans,
    readiness,
    serve_ingester,
    snapshot,
    spool_files,
    wait_writable,
    write_registry,
)
from tests.support.fixtures import KeyPair
from tests.support.processes import ManagedProcess, StorageElementProcess
from tests.support.redis_server import RedisServer

# The contract: a registry change reaches new uploads within a second of its message.
PROPAGATION_S: Final = 1.0


@pytest.fixture(scope="module")
def elements(
    tmp_path_factory: pytest.TempPathFactory, keypair: KeyPair
) -> Iterator[list[StorageElementProcess]]:
    with storage_elements(tmp_path_factory.mktemp("registry"), keypair, ["se-a", "se-b"]) as pair:
        yield pair


def entry(se: StorageElementProcess, priority: int, mode: str = "edit") -> dict[str, object]:
    return {"id": se.element_id, "api_url": se.url, "mode": mode, "priority": priority}


@dataclass
class Scene:
    ingester: ManagedProcess
    http: httpx.AsyncClient
    traffic: Traffic


@asynccontextmanager
async def traffic_on_redis(
    tmp_path: Path,
    keypair: KeyPair,
    redis: RedisServer,
    elements: list[StorageElementProcess],
    token: str,
    seed: int,
) -> AsyncIterator[Scene]:
    """An ingester with no static registry, reading `elements` (se-a preferred) from Redis,
    and uploads running through it. Once the test has halted them: every acknowledged file
    intact, nothing else in the data directories, no spool left."""
    before = snapshot(elements)
    a, b = elements
    await trio.to_thread.run_sync(write_registry, redis.url, [entry(a, 1), entry(b, 2)], 1)
    async with AsyncExitStack() as stack:
        env = {"INGESTER_REDIS_URL": redis.url, "INGESTER_REDIS_TIMEOUT_S": "0.5"}
        ingester = await serve_ingester(stack, tmp_path, keypair, [], env)
        http = await stack.enter_async_context(httpx.AsyncClient(trust_env=False, timeout=30))
        await wait_writable(http, ingester, {"se-a", "se-b"})
        traffic = Traffic(ingester.url, token, seed=seed)
        async with trio.open_nursery() as nursery:
            await nursery.start(traffic.run)
            await trio.sleep(1.0)
            yield Scene(ingester, http, traffic)
            await traffic.halt()
        await traffic.ledger.assert_intact(http, token)
        await assert_no_orphans(elements, traffic.ledger, baseline=before)
        assert spool_files(ingester) == []


async def wait_registry(
    http: httpx.AsyncClient, ingester: ManagedProcess, source: str, ids: list[str], timeout_s: float
) -> tuple[int, dict[str, Any]]:
    """Until readiness reports the registry from `source` with elements `ids`; its answer."""
    answer: tuple[int, dict[str, Any]] = (0, {})
    with trio.move_on_after(timeout_s):
        while True:
            answer = await readiness(http, ingester)
            body = answer[1]
            if (
                body["registry"]["source"] == source
                and [e["id"] for e in body["storage_elements"]] == ids
            ):
                return answer
            await trio.sleep(0.02)
    raise AssertionError(f"registry never became {source} {ids}: {answer}")


def health(answer: tuple[int, dict[str, Any]]) -> tuple[int, str, bool]:
    """Readiness status code, its `status`, and whether Redis is connected."""
    status, body = answer
    return status, body["status"], body["registry"]["redis_connected"]


@pytest.fixture
def on_redis(
    elements: list[StorageElementProcess],
    redis_server: RedisServer,
    tmp_path: Path,
    keypair: KeyPair,
    token: TokenFactory,
) -> Callable[[int], AbstractAsyncContextManager[Scene]]:
    """`traffic_on_redis` for this test's Redis, with a seed."""
    return partial(traffic_on_redis, tmp_path, keypair, redis_server, elements, token())


async def test_redis_killed_during_traffic_keeps_uploads_going_then_resyncs(
    on_redis: Callable[[int], AbstractAsyncContextManager[Scene]],
    elements: list[StorageElementProcess],
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(90):
        async with on_redis(41) as scene:
            http, ingester, traffic = scene.http, scene.ingester, scene.traffic
            await trio.to_thread.run_sync(redis_server.kill)
            answer = await wait_registry(http, ingester, "redis-stale", ["se-a", "se-b"], 5)
            stale_at = trio.current_time()
            assert health(answer) == (200, "degraded", False), answer
            await trio.sleep(2.0)

            # Back on its port, empty (no persistence); the Admin Module writes a new
            # registry that keeps only se-b.
            back_at = trio.current_time()
            await trio.to_thread.run_sync(redis_server.start)
            await trio.to_thread.run_sync(
                write_registry, redis_server.url, [entry(elements[1], 2)], 1
            )
            answer = await wait_registry(http, ingester, "redis", ["se-b"], 10)
            resynced_at = trio.current_time()
            assert health(answer) == (200, "ready", True), answer
            await trio.sleep(1.0)
            await traffic.halt()

            # Every upload that started once the outage was known went on; one in flight
            # when Redis died may end in a clear 503 (its saga record could not be
            # confirmed), with nothing left behind (checked on the way out).
            failed = [run for run in traffic.runs if run.element_id is None]
            assert all(run.started < stale_at for run in failed), (failed, stale_at)
            assert all(key.startswith("503 ") for key in traffic.ledger.errors)
            during = traffic.started_between(stale_at, back_at)
            assert len(during) >= 3, traffic.runs
            # ... with the last known registry, where se-a is preferred.
            assert {run.element_id for run in during} == {"se-a"}
            after = traffic.started_between(resynced_at)
            assert after, traffic.runs
            assert {run.element_id for run in after} == {"se-b"}


async def test_element_set_read_only_through_pubsub_gets_no_new_upload(
    on_redis: Callable[[int], AbstractAsyncContextManager[Scene]],
    elements: list[StorageElementProcess],
    redis_server: RedisServer,
) -> None:
    a, b = elements
    with trio.fail_after(90):
        async with on_redis(42) as scene:
            traffic = scene.traffic
            await trio.to_thread.run_sync(
                write_registry, redis_server.url, [entry(a, 1, mode="ro"), entry(b, 2)], 2
            )
            announced_at = trio.current_time()
            await trio.sleep(PROPAGATION_S + 1.5)
            await traffic.halt()
            _, body = await readiness(scene.http, scene.ingester)

            assert body["writable_storage_elements"] == ["se-b"], body
            assert not traffic.ledger.errors, traffic.ledger.errors
            before = traffic.started_between(0, announced_at)
            assert "se-a" in {run.element_id for run in before}
            # Uploads in flight on se-a when it turned read-only finished there (201); none
            # that started a second after the message went there.
            late = traffic.started_between(announced_at + PROPAGATION_S)
            assert len(late) >= 3, traffic.runs
            assert {run.element_id for run in late} == {"se-b"}
