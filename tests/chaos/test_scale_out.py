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
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from ingester.dev_replicas import server_states
from tests.conftest import TokenFactory
from tests.support.fixtures import KeyPair
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


async def check_invariants(world: World, ledger: Ledger, sent: list[bytes], since: float) -> float:
    """The scenario's end state; the seconds from `since` until the elements held exactly
    the acknowledged files."""
    assert ledger.failures == [], ledger.failures
    expected = Counter({hashlib.sha256(data).hexdigest(): 1 for data in sent})
    assert set(ledger.stored) == set(expected), "a client was not told its file is stored"
    try:
        await eventually(
            lambda: world.stored() == expected and world.saga_records() == 0,
            timeout_s=CLEANUP_WITHIN_S,
        )
    except trio.TooSlowError:
        extra = world.stored() - expected
        missing = expected - world.stored()
        raise AssertionError(
            f"left on elements: {dict(extra)}; missing: {dict(missing)}; "
            f"sagas open: {world.saga_records()}"
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
