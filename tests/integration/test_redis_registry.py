"""The registry from Redis, end to end: a real redis-server on a free port (or a master, its
replica and three Sentinels), two reference Storage Elements, the ingester, and `ingester
registry ...` run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio

from ingester.storage.redis_registry import DISCOVERY_CHANNEL
from tests.conftest import TokenFactory
from tests.support.client import MultipartUpload, post_upload
from tests.support.fixtures import KeyPair
from tests.support.processes import (
    ManagedProcess,
    StorageElementProcess,
    child_env,
    start_ingester,
    start_storage_element,
)
from tests.support.redis_sentinel import SentinelRedis
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually

# The feed's PING finds the silent master within `PUBSUB_PING_S` plus the timeout, then it
# subscribes again through Sentinel; 30 s would be the default periodic re-read.
FEED_FOLLOWS_S = 10.0


@dataclass
class Elements:
    root: Path
    keys: KeyPair
    a: StorageElementProcess
    b: StorageElementProcess


@pytest.fixture(scope="module")
def elements(tmp_path_factory: pytest.TempPathFactory, keypair: KeyPair) -> Iterator[Elements]:
    # Both in edit mode: the registry, not the element, decides where uploads go.
    root = tmp_path_factory.mktemp("redis-registry")
    started: list[StorageElementProcess] = []
    try:
        for element_id in ("se-a", "se-b"):
            started.append(
                start_storage_element(
                    root, element_id=element_id, mode="edit", public_key=keypair.public_path
                )
            )
        yield Elements(root, keypair, *started)
    finally:
        for proc in started:
            proc.terminate()


async def registry_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ingester", "registry", *args],
            env=child_env({"INGESTER_REDIS_URL": redis_url}),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    return await trio.to_thread.run_sync(run)


async def cli_ok(redis_url: str, *args: str) -> str:
    result = await registry_cli(redis_url, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def set_element(
    redis_url: str, se: StorageElementProcess, *, mode: str = "edit", priority: int = 100
) -> None:
    await cli_ok(
        redis_url, "set", "--id", se.element_id, "--api-url", se.url, "--mode", mode,
        "--priority", str(priority),
    )  # fmt: skip


async def start(
    elements: Elements, tmp_path: Path, redis_url: str, static: list[dict[str, object]], **env: str
) -> ManagedProcess:
    return await trio.to_thread.run_sync(
        lambda: start_ingester(
            tmp_path,
            name="ingester",
            public_key=elements.keys.public_path,
            elements=static,
            env={"INGESTER_REDIS_URL": redis_url, "INGESTER_REDIS_TIMEOUT_S": "0.5", **env},
        )
    )


async def ready(http: httpx.AsyncClient, proc: ManagedProcess) -> tuple[int, dict[str, Any]]:
    response = await http.get(proc.url + "/health/ready")
    return response.status_code, response.json()


async def wait_ready_where(
    http: httpx.AsyncClient, proc: ManagedProcess, check: Any, timeout_s: float
) -> float:
    """Poll readiness until `check(status, body)`; the seconds it took."""
    state: dict[str, Any] = {}
    started = trio.current_time()
    with trio.move_on_after(timeout_s):
        while True:
            status, body = await ready(http, proc)
            state.update(status=status, body=body)
            if check(status, body):
                return trio.current_time() - started
            await trio.sleep(0.02)
    raise AssertionError(f"readiness never matched within {timeout_s} s: {state}")


async def upload_to(http: httpx.AsyncClient, proc: ManagedProcess, token: str) -> str:
    response = await post_upload(http, proc.url, token, MultipartUpload([b"r" * 2048]))
    assert response.status_code == 201, response.text
    element_id: str = response.json()["storage_element_id"]
    return element_id


def writable_ids(body: dict[str, Any]) -> set[str]:
    return set(body["writable_storage_elements"])


def modes(body: dict[str, Any]) -> dict[str, str]:
    return {e["id"]: e["mode"] for e in body["storage_elements"]}


def feed_subscribers(port: int) -> int:
    """Subscribers of the change feed on the Redis at `port`."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
    try:
        return int(dict(client.pubsub_numsub(DISCOVERY_CHANNEL))[DISCOVERY_CHANNEL.encode()])
    finally:
        client.close()


async def test_registry_written_by_the_cli_directs_uploads(
    elements: Elements, redis_server: RedisServer, tmp_path: Path, token: TokenFactory
) -> None:
    with trio.fail_after(45):
        # Redis has no registry yet: the static one (se-b only) serves meanwhile.
        proc = await start(elements, tmp_path, redis_server.url, [elements.b.registry_entry()])
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                await wait_ready_where(http, proc, lambda s, b: s == 200, 15)
                _, body = await ready(http, proc)
                assert body["registry"]["source"] == "static"
                assert body["registry"]["redis_connected"] is True
                assert await upload_to(http, proc, token()) == "se-b"

                await set_element(redis_server.url, elements.a)
                took = await wait_ready_where(
                    http, proc, lambda s, b: b["registry"]["source"] == "redis", 1.0
                )
                assert took < 1.0
                _, body = await ready(http, proc)
                assert [e["id"] for e in body["storage_elements"]] == ["se-a"]
                assert await upload_to(http, proc, token()) == "se-a"
                metrics = (await http.get(proc.url + "/metrics")).text
                assert 'ingester_registry_source{source="redis"} 1.0' in metrics
                assert "ingester_registry_elements 1.0" in metrics
        finally:
            await trio.to_thread.run_sync(proc.terminate)


async def test_mode_change_to_ro_takes_effect_within_a_second(
    elements: Elements, redis_server: RedisServer, tmp_path: Path, token: TokenFactory
) -> None:
    with trio.fail_after(45):
        await set_element(redis_server.url, elements.a, priority=1)
        await set_element(redis_server.url, elements.b, priority=2)
        proc = await start(elements, tmp_path, redis_server.url, [])
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                await wait_ready_where(
                    http, proc, lambda s, b: writable_ids(b) == {"se-a", "se-b"}, 15
                )
                assert await upload_to(http, proc, token()) == "se-a"

                await set_element(redis_server.url, elements.a, mode="ro", priority=1)
                announced = trio.current_time()
                await wait_ready_where(
                    http,
                    proc,
                    lambda s, b: any(
                        e["id"] == "se-a" and e["mode"] == "ro" for e in b["storage_elements"]
                    ),
                    1.0,
                )
                # Within the second after the announcement, and after it: never se-a again.
                while trio.current_time() - announced < 1.5:
                    assert await upload_to(http, proc, token()) == "se-b"
        finally:
            await trio.to_thread.run_sync(proc.terminate)


async def test_redis_outage_keeps_the_last_registry_and_resyncs(
    elements: Elements, redis_server: RedisServer, tmp_path: Path, token: TokenFactory
) -> None:
    with trio.fail_after(60):
        await set_element(redis_server.url, elements.a, priority=1)
        await set_element(redis_server.url, elements.b, priority=2)
        proc = await start(elements, tmp_path, redis_server.url, [])
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                await wait_ready_where(
                    http, proc, lambda s, b: writable_ids(b) == {"se-a", "se-b"}, 15
                )

                await trio.to_thread.run_sync(redis_server.kill)
                await wait_ready_where(
                    http,
                    proc,
                    lambda s, b: (
                        b["registry"]["source"] == "redis-stale"
                        and b["registry"]["redis_connected"] is False
                    ),
                    5,
                )
                status, body = await ready(http, proc)
                assert status == 200
                assert body["status"] == "degraded"
                assert body["degraded"]
                assert await upload_to(http, proc, token()) == "se-a"
                metrics = (await http.get(proc.url + "/metrics")).text
                assert 'ingester_registry_source{source="redis-stale"} 1.0' in metrics
                # Requests must not wait on the dead Redis.
                started = trio.current_time()
                await ready(http, proc)
                assert trio.current_time() - started < 0.5

                # Back on the same port, empty (no persistence): a new registry, se-b only.
                await trio.to_thread.run_sync(redis_server.start)
                await set_element(redis_server.url, elements.b, priority=2)
                await wait_ready_where(
                    http,
                    proc,
                    lambda s, b: (
                        b["registry"]["source"] == "redis"
                        and [e["id"] for e in b["storage_elements"]] == ["se-b"]
                    ),
                    10,
                )
                status, body = await ready(http, proc)
                assert (status, body["status"], body["registry"]["redis_connected"]) == (
                    200,
                    "ready",
                    True,
                )
                assert await upload_to(http, proc, token()) == "se-b"
            # The outage was logged once, not once per attempt.
            lost = [line for line in proc.log_lines() if "Redis unreachable" in line]
            assert 1 <= len(lost) <= 2, lost
        finally:
            await trio.to_thread.run_sync(proc.terminate)


async def test_the_change_feed_follows_a_failover_away_from_a_silent_master(
    elements: Elements, sentinel_redis: SentinelRedis, tmp_path: Path
) -> None:
    """The master vanishes without closing its sockets (a dead host, a cut link: SIGSTOP
    here) and Sentinel promotes the replica. An announcement on the new master reaches the
    registry within seconds, not at the periodic re-read (300 s here, so it cannot stand in
    for the feed), and the feed is subscribed on the new master."""
    cluster = sentinel_redis
    with trio.fail_after(90):
        await set_element(cluster.url, elements.a)
        proc = await start(
            elements, tmp_path, cluster.url, [], INGESTER_REDIS_REGISTRY_REFRESH_S="300"
        )
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                await wait_ready_where(http, proc, lambda s, b: modes(b) == {"se-a": "edit"}, 15)
                old = cluster.node_on(cluster.master.port)
                await eventually(lambda: feed_subscribers(old.port) == 1, timeout_s=10)
                old.pause()
                try:
                    new_port, promoted_s = await trio.to_thread.run_sync(
                        lambda: cluster.wait_failover(old.port, timeout_s=15)
                    )
                    await trio.to_thread.run_sync(
                        lambda: cluster.wait_all_name(new_port, timeout_s=15)
                    )
                    # Written and announced on the new master.
                    await set_element(cluster.url, elements.b)
                    followed_s = await wait_ready_where(
                        http,
                        proc,
                        lambda s, b: modes(b) == {"se-a": "edit", "se-b": "edit"},
                        FEED_FOLLOWS_S,
                    )
                    # The feed itself moves to the new master (the change may have come
                    # first by the read made when the feed was lost), and the next
                    # announcement arrives as one does when nothing failed.
                    await eventually(
                        lambda: feed_subscribers(new_port) == 1, timeout_s=FEED_FOLLOWS_S
                    )
                    await set_element(cluster.url, elements.a, mode="ro")
                    await wait_ready_where(
                        http, proc, lambda s, b: modes(b) == {"se-a": "ro", "se-b": "edit"}, 2.0
                    )
                finally:
                    old.resume()
            print(  # the figure the README quotes
                f"master frozen: promoted after {promoted_s:.2f}s, the announcement on the new "
                f"master in the registry {followed_s:.2f}s after it was made"
            )
        finally:
            await trio.to_thread.run_sync(proc.terminate)


async def test_cli_list_set_remove_and_errors(redis_server: RedisServer) -> None:
    url = redis_server.url
    with trio.fail_after(60):
        assert "ID" in await cli_ok(url, "list")
        await cli_ok(
            url, "set", "--id", "se-1", "--api-url", "http://h1:8010", "--mode", "rw",
            "--priority", "5", "--capacity-bytes", "1000", "--status", "maintenance",
        )  # fmt: skip
        table = (await cli_ok(url, "list")).splitlines()
        assert table[0].startswith("version 1,")
        assert table[1].split() == [
            "ID", "MODE", "STATUS", "PRIORITY", "CAPACITY", "USED", "API_URL",
        ]  # fmt: skip
        assert table[2].split() == ["se-1", "rw", "maintenance", "5", "1000", "-", "http://h1:8010"]

        # Concurrent writers: WATCH/MULTI loses no update.
        async with trio.open_nursery() as nursery:
            for n in range(2, 7):
                nursery.start_soon(
                    cli_ok, url, "set", "--id", f"se-{n}", "--api-url", f"http://h{n}", "--mode",
                    "edit",
                )  # fmt: skip
        document = json.loads(await cli_ok(url, "list", "--json"))
        assert document["version"] == 6
        assert document["count"] == 6
        assert sorted(e["element_id"] for e in document["storage_elements"]) == [
            f"se-{n}" for n in range(1, 7)
        ]

        result = await registry_cli(url, "remove", "--id", "se-1")
        assert result.returncode == 0, result.stderr
        document = json.loads(await cli_ok(url, "list", "--json"))
        assert (document["version"], document["count"]) == (7, 5)

        unknown = await registry_cli(url, "remove", "--id", "nope")
        assert unknown.returncode == 2
        assert unknown.stderr.strip().splitlines() == [
            "ingester registry remove: no Storage Element with id 'nope'"
        ]

        bad = await registry_cli(url, "set", "--id", "x", "--api-url", "nope", "--mode", "rw")
        assert bad.returncode == 2
        assert len(bad.stderr.strip().splitlines()) == 1
        assert "api_url" in bad.stderr

        await trio.to_thread.run_sync(redis_server.kill)
        for args in (("list",), ("remove", "--id", "se-2")):
            down = await registry_cli(url, *args)
            assert down.returncode == 2
            lines = down.stderr.strip().splitlines()
            assert len(lines) == 1, lines
            assert "unreachable" in lines[0]
            assert "Traceback" not in down.stderr
