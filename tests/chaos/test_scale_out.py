"""Scale-out chaos: three ingester replicas behind haproxy, Redis under Sentinel, two
reference elements, all real processes (tests/support/scale_out.py). Clients go through
haproxy and behave as the README asks: multipart uploads retry with their `Idempotency-Key`
after a failure or a 503 (following `Retry-After`), tus uploads ask `HEAD` and resume.

Whatever breaks, every scenario checks the same things a user would:
- every file a client was told is stored is on an element exactly once with the checksum
  sent, and no client gave up;
- nothing else is left on any element (the dead replica's unacknowledged copies are removed
  by another replica's janitor within the lease), and every saga finishes.

Sizes here fit `make test`; `make chaos` runs the `soak` variant with more uploads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from ingester.dev_replicas import server_states
from tests.conftest import TokenFactory
from tests.support.fixtures import KeyPair
from tests.support.redis_server import RedisServer
from tests.support.scale_out import (
    JANITOR_S,
    LEASE_S,
    Ledger,
    World,
    scale_out,
    tus_resuming,
    upload_retrying,
)
from tests.support.waiting import eventually

KIB = 1024
# haproxy marks a server down after `fall` failed checks `inter` apart (2 x 1 s), each
# bounded by `timeout check` (2 s) for a hung one; a refused connection fails at once.
EJECT_WITHIN_S = 4.0
# A dead replica's copies: its lease runs out, a janitor round claims them, the element
# deletes; plus the pace of a loaded 2-core machine.
CLEANUP_WITHIN_S = LEASE_S + JANITOR_S + 6.0
SOAK_UPLOADS = int(os.environ.get("INGESTER_SOAK_UPLOADS", "0"))


@pytest.fixture
def world(tmp_path: Path, keypair: KeyPair) -> Iterator[World]:
    with scale_out(tmp_path, keypair, replicas=3) as world:
        yield world


def files(count: int, size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size + rng.randrange(size)) for _ in range(count)]


async def status(http: httpx.AsyncClient, world: World, index: int) -> str:
    """haproxy's status of a replica (`UP`, `UP 1/2`, `DOWN`, ...)."""
    try:
        states = server_states((await http.get(world.stats_url)).text)
    except httpx.HTTPError:
        return "?"
    return states.get(world.name(index), ("?", ""))[0]


async def until_status(
    http: httpx.AsyncClient, world: World, index: int, prefix: str, timeout_s: float
) -> float:
    """Seconds until haproxy's status of the replica starts with `prefix` (`DOWN`: out of
    rotation; `UP` with its check passed: back)."""
    started = time.monotonic()
    with trio.fail_after(timeout_s):
        while not (await status(http, world, index)).startswith(prefix):  # noqa: ASYNC110
            await trio.sleep(0.05)
    return time.monotonic() - started


async def in_flight(http: httpx.AsyncClient, url: str) -> float:
    """The replica's `ingester_uploads_in_flight` (0 when it does not answer)."""
    try:
        text = (await http.get(url + "/metrics")).text
    except httpx.HTTPError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("ingester_uploads_in_flight "):
            return float(line.split()[1])
    return 0.0


def unreplicated(world: World, fault_at: float) -> str:
    """The replicas' writes that no Redis replica acknowledged in time (`WAIT` timed out):
    a failover in that window may lose them, which Redis replication allows (README,
    "Redis with Sentinel"). Said when an invariant fails, to tell that window from a bug.
    Only those before the fault (`fault_at`, unix time) can have been lost by it: after a
    Redis failover the promoted master has no replica until the old one comes back, so
    every replica logs one such line then."""
    before: list[str] = []
    after: list[str] = []
    for index, proc in enumerate(world.replicas):
        if proc is None:
            continue
        for line in proc.log_lines():
            if "redis_unreplicated" not in line:
                continue
            try:
                when = datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00"))
                late = when.timestamp() >= fault_at
            except (ValueError, KeyError, TypeError):
                late = False
            (after if late else before).append(f"{world.name(index)}: {line.strip()[:200]}")
    return (
        f"writes unreplicated when written, before the fault: {len(before)} {before[:3]}"
        f" (after it: {len(after)})"
    )


async def check_invariants(world: World, ledger: Ledger, sent: list[bytes], since: float) -> float:
    """The scenario's end state; the seconds from `since` until the elements held exactly
    the acknowledged files, each once (the result a retry reads is written in the step that
    settles the upload's saga: see the README, "Scaling out")."""
    assert ledger.failures == [], ledger.failures
    expected = Counter({hashlib.sha256(data).hexdigest(): 1 for data in sent})
    assert set(ledger.stored) == set(expected), "a client was not told its file is stored"

    def settled() -> bool:
        return world.stored() == expected and world.saga_records() == 0

    try:
        await eventually(settled, timeout_s=CLEANUP_WITHIN_S)
    except trio.TooSlowError:
        extra = world.stored() - expected
        missing = expected - world.stored()
        # Each copy of a file left twice, and what the logs say of it: which replica sent
        # it, and what became of its saga.
        traces = {
            f"{element}/{file_id}": world.trace(file_id)
            for sha in extra
            for element, file_id in world.copies_of(sha)
        }
        raise AssertionError(
            f"left on elements: {dict(extra)}; missing: {dict(missing)} "
            f"(file ids {[ledger.stored.get(sha) for sha in missing]}); "
            f"sagas open: {world.saga_records()}; "
            f"{unreplicated(world, time.time() - (time.monotonic() - since))}; "
            f"the extra files' copies: {traces}"
        ) from None
    return time.monotonic() - since


async def run_clients(
    http: httpx.AsyncClient,
    world: World,
    token: str,
    ledger: Ledger,
    multipart: list[bytes],
    tus: list[bytes],
    nursery: trio.Nursery,
    *,
    prefix: str,
    pace_s: float,
) -> None:
    for i, data in enumerate(multipart):
        nursery.start_soon(
            partial(
                upload_retrying,
                http, world.url, token, data, ledger, key=f"{prefix}-{i}", pace_s=pace_s,
            )
        )  # fmt: skip
    for i, data in enumerate(tus):
        nursery.start_soon(
            partial(tus_resuming, http, world.url, token, data, ledger, name=f"{prefix}-tus-{i}")
        )


async def test_sigkill_a_replica_mid_upload(world: World, token: TokenFactory) -> None:
    with trio.fail_after(90):
        ledger = Ledger()
        multipart = files(9, 384 * KIB, seed=1)
        tus = files(3, 512 * KIB, seed=2)
        victim = 0
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            async with trio.open_nursery() as nursery:
                await run_clients(
                    http, world, token(), ledger, multipart, tus, nursery,
                    prefix="kill", pace_s=0.05,
                )  # fmt: skip
                # Kill it while it has uploads in flight.
                with trio.fail_after(15):
                    while await in_flight(http, world.replica(victim).url) < 1:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                world.kill_replica(victim)
                killed = time.monotonic()
                ejected_s = await until_status(http, world, victim, "DOWN", EJECT_WITHIN_S + 5)
            cleaned_s = await check_invariants(world, ledger, multipart + tus, killed)
        print(
            f"replica SIGKILLed: haproxy ejected it after {ejected_s:.2f}s, elements clean "
            f"{cleaned_s:.2f}s after the kill; retries {dict(ledger.retries)}"
        )
        assert ejected_s <= EJECT_WITHIN_S
        assert sum(ledger.retries.values()) >= 1, "the kill hit no upload: the test proved nothing"


class Load:
    """Clients that keep uploading until `stop`: multipart workers and tus workers, each file
    new random bytes, every one sent recorded in `sent`."""

    def __init__(
        self, http: httpx.AsyncClient, world: World, token: str, *, prefix: str, seed: int
    ) -> None:
        self.http = http
        self.world = world
        self.token = token
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.sent: list[bytes] = []
        self.stop = trio.Event()

    def _file(self, size: int) -> bytes:
        data = self.rng.randbytes(size + self.rng.randrange(size))
        self.sent.append(data)
        return data

    async def _multipart(self, worker: int, pace_s: float) -> None:
        n = 0
        while not self.stop.is_set():
            data = self._file(256 * KIB)
            key = f"{self.prefix}-{worker}-{n}"
            await upload_retrying(
                self.http, self.world.url, self.token, data, self.ledger, key=key, pace_s=pace_s
            )
            n += 1

    async def _tus(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            data = self._file(384 * KIB)
            name = f"{self.prefix}-tus-{worker}-{n}"
            await tus_resuming(self.http, self.world.url, self.token, data, self.ledger, name=name)
            n += 1

    def start(self, nursery: trio.Nursery, *, multipart: int, tus: int, pace_s: float) -> None:
        for worker in range(multipart):
            nursery.start_soon(self._multipart, worker, pace_s)
        for worker in range(tus):
            nursery.start_soon(self._tus, worker)

    async def uploads_done(self, count: int, timeout_s: float) -> None:
        """Until `count` files are stored (the load is really running)."""
        with trio.fail_after(timeout_s):
            while len(self.ledger.stored) < count:  # noqa: ASYNC110
                await trio.sleep(0.02)


async def test_rolling_restart_clients_following_retry_after_see_no_failure(
    world: World, token: TokenFactory
) -> None:
    with trio.fail_after(150):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            load = Load(http, world, token(), prefix="roll", seed=3)
            async with trio.open_nursery() as nursery:
                load.start(nursery, multipart=6, tus=2, pace_s=0.02)
                await load.uploads_done(4, timeout_s=20)
                started = time.monotonic()
                for index in range(len(world.replicas)):
                    before = len(load.ledger.stored)
                    code = await trio.to_thread.run_sync(world.replica(index).terminate)
                    assert code == 0, world.replica(index).log_tail()
                    await until_status(http, world, index, "DOWN", EJECT_WITHIN_S + 5)
                    await trio.to_thread.run_sync(world.start_replica, index)
                    await until_status(http, world, index, "UP", 15)
                    # Uploads went on while it was away and back.
                    await load.uploads_done(before + 2, timeout_s=20)
                rolled_s = time.monotonic() - started
                load.stop.set()
            await check_invariants(world, load.ledger, load.sent, time.monotonic())
        retries = dict(load.ledger.retries)
        print(
            f"rolling restart of 3 replicas in {rolled_s:.1f}s: {len(load.sent)} uploads, "
            f"retries {retries}"
        )
        # The only refusals a client saw came with Retry-After: the draining replica's, and
        # admission's on the others while one of three is out (on a loaded CI machine the
        # uploads slow down and one user's pile up past INGESTER_MAX_UPLOADS_PER_USER).
        assert set(retries) <= {
            "503 SHUTTING_DOWN",
            "tus 503 SHUTTING_DOWN",
            "429 TOO_MANY_UPLOADS",
            "tus 429 TOO_MANY_UPLOADS",
        }, retries
        assert retries.get("503 SHUTTING_DOWN", 0) + retries.get("tus 503 SHUTTING_DOWN", 0)


async def test_sigkill_the_redis_master_under_load(world: World, token: TokenFactory) -> None:
    await redis_failover(world, token, kill_replica=False)


async def test_sigkill_the_redis_master_and_a_replica_together(
    world: World, token: TokenFactory
) -> None:
    await redis_failover(world, token, kill_replica=True)


async def until_scripts_run(node: RedisServer, *, timeout_s: float) -> None:
    def evalsha_calls() -> int:
        client = node.client()
        try:
            stats = client.info("commandstats").get("cmdstat_evalsha", {})
        finally:
            client.close()
        return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0

    with trio.fail_after(timeout_s):
        while not await trio.to_thread.run_sync(evalsha_calls):  # noqa: ASYNC110
            await trio.sleep(0.05)


async def redis_failover(world: World, token: TokenFactory, *, kill_replica: bool) -> None:
    with trio.fail_after(120):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            load = Load(http, world, token(), prefix="redis", seed=4 + kill_replica)
            async with trio.open_nursery() as nursery:
                load.start(nursery, multipart=6, tus=2, pace_s=0.02)
                await load.uploads_done(4, timeout_s=20)
                old_port = world.redis.master.port
                killed = time.monotonic()
                world.redis.kill_master()
                if kill_replica:
                    world.kill_replica(0)
                _, promoted_s = await trio.to_thread.run_sync(
                    lambda: world.redis.wait_failover(old_port, timeout_s=15)
                )
                # The replicas write to the new master: their scripts (saga, tus, idempotency)
                # run there. A replica applies a master's scripts as their effects, so the
                # first EVALSHA it counts is one sent to it as master.
                await until_scripts_run(world.redis.replica, timeout_s=15)
                writing_s = time.monotonic() - killed
                before = len(load.ledger.stored)
                await load.uploads_done(before + 6, timeout_s=20)
                load.stop.set()
            cleaned_s = await check_invariants(world, load.ledger, load.sent, killed)
        what = "Redis master and replica-1" if kill_replica else "Redis master"
        print(
            f"{what} SIGKILLed: promoted after {promoted_s:.2f}s, ingesters writing to the new "
            f"master after {writing_s:.2f}s, elements clean after {cleaned_s:.2f}s; "
            f"{len(load.sent)} uploads, retries {dict(load.ledger.retries)}"
        )


async def restart_as_replica(world: World, node: RedisServer, timeout_s: float) -> None:
    """Start a killed Redis node again (empty: no persistence); Sentinel makes it a replica of
    the current master, and it syncs. Sentinel reconfigures a returning node on its own
    schedule: on a loaded machine (a CI runner, tests in parallel) that took over 30 s once."""
    await trio.to_thread.run_sync(node.start)

    def synced() -> bool:
        client = node.client()
        try:
            info = client.info("replication")
        finally:
            client.close()
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    with trio.fail_after(timeout_s):
        while not await trio.to_thread.run_sync(synced):  # noqa: ASYNC110
            await trio.sleep(0.1)


@pytest.mark.soak
async def test_soak_random_replica_and_redis_kills(
    world: World, token: TokenFactory, record_property: Callable[[str, object], None]
) -> None:
    """Rounds of a random fault under load until the uploads are done: a replica SIGKILLed,
    a replica SIGTERMed (each restarted once haproxy has it down), or the Redis master
    SIGKILLed (restarted once Sentinel promoted the replica, to come back as its replica)."""
    uploads = SOAK_UPLOADS or 40
    rng = random.Random(20261206)
    faults: Counter[str] = Counter()
    with trio.fail_after(60 + uploads * 2):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            load = Load(http, world, token(), prefix="soak", seed=6)
            async with trio.open_nursery() as nursery:
                load.start(nursery, multipart=6, tus=2, pace_s=0.02)
                while len(load.ledger.stored) < uploads:
                    fault = rng.choice(["replica SIGKILL", "replica SIGTERM", "Redis master"])
                    faults[fault] += 1
                    before = len(load.ledger.stored)
                    if fault == "Redis master":
                        old_port = world.redis.master_port()
                        assert old_port is not None
                        dead = world.redis.kill_master()
                        new_port, _ = await trio.to_thread.run_sync(
                            partial(world.redis.wait_failover, old_port, timeout_s=15)
                        )
                        await trio.to_thread.run_sync(
                            partial(world.redis.wait_all_name, new_port, timeout_s=15)
                        )
                        await restart_as_replica(world, dead, timeout_s=60)
                    else:
                        index = rng.randrange(len(world.replicas))
                        if fault == "replica SIGKILL":
                            world.kill_replica(index)
                        else:
                            await trio.to_thread.run_sync(world.replica(index).terminate)
                        await until_status(http, world, index, "DOWN", EJECT_WITHIN_S + 5)
                        await trio.to_thread.run_sync(world.start_replica, index)
                        await until_status(http, world, index, "UP", 15)
                    await load.uploads_done(before + 5, timeout_s=30)
                load.stop.set()
            await check_invariants(world, load.ledger, load.sent, time.monotonic())
        twice = sum(1 for count in world.stored().values() if count > 1)
        record_property(
            "summary",
            f"scale-out soak: {len(load.sent)} uploads, faults {dict(faults)}, "
            f"stored twice {twice}, retries {dict(load.ledger.retries)}",
        )
