"""A soak: uploads of mixed sizes, some compressed, through three elements that are SIGKILLed
and restarted at random (seeded, bounded) while the uploads run.

Checks zero lost acknowledged files (each downloaded from its element and hashed), zero
orphans once every element is back, every failure a clear error, and no growth of the
ingester's open files, sockets, threads or memory between a warm-up and the end.

`make test` runs a small one (about a minute); `make chaos` a long one:

    INGESTER_SOAK_UPLOADS=300 pytest tests/chaos -m soak

`INGESTER_SOAK_SEED` picks another seed. The last line printed is the summary.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from tests.conftest import TokenFactory
from tests.support.chaos import (
    Ledger,
    PacedBody,
    Resources,
    assert_no_orphans,
    data_files,
    orphans,
    post_paced,
    resources,
    restart_element,
    serve_ingester,
    spool_files,
    start_elements,
    temporary_sizes,
    upload_of,
    wait_writable,
)
from tests.support.client import MIB
from tests.support.fixtures import KeyPair
from tests.support.processes import StorageElementProcess
from tests.support.waiting import eventually

UPLOADS: Final = int(os.environ.get("INGESTER_SOAK_UPLOADS", "60"))
SEED: Final = int(os.environ.get("INGESTER_SOAK_SEED", "20261128"))
CONCURRENCY: Final = 4
ELEMENTS: Final = 3
WARM_UP: Final = 4 * CONCURRENCY
WARM_UP_KILLS: Final = 2
KIB: Final = 1024
# (weight, smallest, largest): mostly small documents, some MiBs, a few tens of MiB.
SIZES: Final = [(0.45, 1 * KIB, 256 * KIB), (0.4, 256 * KIB, 6 * MIB), (0.15, 6 * MIB, 32 * MIB)]
COMPRESSED_SHARE: Final = 0.25
# Clients over a network, not loopback at full speed: uploads last long enough for kills
# to land in them, and the run lasts long enough for many kills.
CLIENT_RATE: Final = (2 * MIB, 8 * MIB)
THINK_S: Final = (0.0, 1.0)
# One kill per this many uploads at most; an element is down for a random moment.
UPLOADS_PER_KILL: Final = 8
PAUSE_S: Final = (0.3, 1.5)
DOWN_S: Final = (0.2, 1.5)
# Memory may settle a little higher after a run (allocator arenas); a leak grows with it.
RSS_TOLERANCE_BYTES: Final = 24 * MIB
RSS_TOLERANCE_SHARE: Final = 0.2
ENV: Final = {
    "INGESTER_SE_STALL_TIMEOUT_S": "3",
    "INGESTER_SE_PROBE_INTERVAL_S": "0.5",
    "INGESTER_BREAKER_OPEN_S": "1",
    "INGESTER_UPLOAD_DEADLINE_S": "120",
    "INGESTER_LOG_LEVEL": "WARNING",
}


@dataclass(frozen=True)
class Planned:
    size: int
    seed: int
    compress: str | None
    bytes_per_s: float  # the client's pace
    think_s: float  # its pause before the next upload


def random_size(rng: random.Random) -> int:
    """A size from one of the SIZES ranges, chosen by weight."""
    low, high = rng.choices([(lo, hi) for _, lo, hi in SIZES], [w for w, _, _ in SIZES])[0]
    return rng.randint(low, high)


def plan(rng: random.Random, count: int) -> Iterator[Planned]:
    for _ in range(count):
        compress = None
        if rng.random() < COMPRESSED_SHARE:
            compress = rng.choice(["brotli", "gzip"])
        yield Planned(
            size=random_size(rng),
            seed=rng.randrange(1 << 30),
            compress=compress,
            bytes_per_s=rng.uniform(*CLIENT_RATE),
            think_s=rng.uniform(*THINK_S),
        )


class Soak:
    def __init__(self, ingester_url: str, token: str, elements: list[StorageElementProcess]):
        self.url = ingester_url
        self.token = token
        self.elements = elements
        self.ledger = Ledger()
        self.kills = 0
        self.transport_errors: list[str] = []

    async def uploads(self, planned: Iterator[Planned]) -> None:
        """`CONCURRENCY` clients, each taking the next planned upload until none is left."""

        async def client() -> None:
            async with httpx.AsyncClient(trust_env=False, timeout=180) as http:
                for item in planned:
                    body = upload_of(item.size, seed=item.seed, compress=item.compress)
                    paced = PacedBody(body, bytes_per_s=item.bytes_per_s, piece=256 * KIB)
                    try:
                        response = await post_paced(http, self.url, self.token, body, paced)
                    except httpx.TransportError as exc:
                        # The ingester never dies here: a lost answer is a failure.
                        self.transport_errors.append(repr(exc))
                        continue
                    self.ledger.add(response, body)
                    await trio.sleep(item.think_s)

        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(client)

    async def phase(
        self, stack: contextlib.AsyncExitStack, seed: int, uploads: int, kills: int
    ) -> None:
        """`uploads` planned from `seed` while the monkey kills up to `kills` times (its own
        random sequence, so the uploads planned do not depend on the timing of kills)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.monkey, stack, random.Random(seed + 1), kills)
            await self.uploads(plan(random.Random(seed), uploads))
            nursery.cancel_scope.cancel()

    async def monkey(
        self, stack: contextlib.AsyncExitStack, rng: random.Random, max_kills: int
    ) -> None:
        """Kills one element at a time (preferably one receiving), restarts it on its port
        and data directory after a moment; until cancelled or `max_kills`."""
        while self.kills < max_kills:
            await trio.sleep(rng.uniform(*PAUSE_S))
            busy = [n for n, se in enumerate(self.elements) if temporary_sizes(se)]
            n = rng.choice(busy) if busy else rng.randrange(len(self.elements))
            victim = self.elements[n]
            victim.kill()
            self.kills += 1
            try:
                await trio.sleep(rng.uniform(*DOWN_S))
            finally:
                with trio.CancelScope(shield=True):
                    self.elements[n] = await restart_element(victim)


# The ingester's spool files, by name (`SpoolFiles`: `<spool dir>/spool-<pid>-<hex>-<n>`).
SPOOL_FILE = "/spool/spool-"


def grown(warm: Resources, now: Resources) -> list[str]:
    """What grew from the warm-up to now beyond what a pool or an allocator explains."""
    problems = []
    # Idle spool files stay open for the next upload (`SpoolFiles`), and which ones stay
    # varies: no more than the uploads that ran at once can ever be open, where a leak would
    # grow with the number of uploads.
    spools = [f for f in now.files if SPOOL_FILE in f]
    if len(spools) > CONCURRENCY:
        problems.append(f"{len(spools)} spool files open: {sorted(spools)}")
    files, warm_files = ({f for f in r.files if SPOOL_FILE not in f} for r in (now, warm))
    if files != warm_files:
        problems.append(f"open files {sorted(files ^ warm_files)}")
    # Keep-alive connections to elements vary with what ran last (uploads, probes,
    # compensations: a few per element), and a client connection closed after an upload
    # waits for the keep-alive timeout (CLOSE_WAIT, in the summary); leaked ones would pile
    # up with the number of uploads.
    if now.sockets > warm.sockets + 2 * CONCURRENCY * ELEMENTS:
        problems.append(f"sockets {warm.sockets} -> {now.sockets}")
    if now.other_fds > warm.other_fds:
        problems.append(f"other descriptors {warm.other_fds} -> {now.other_fds}")
    # Idle worker threads leave after trio's 10 s idle timeout.
    if now.threads > warm.threads:
        problems.append(f"threads {warm.threads} -> {now.threads}")
    allowed = max(RSS_TOLERANCE_BYTES, int(warm.rss_bytes * RSS_TOLERANCE_SHARE))
    if now.rss_bytes > warm.rss_bytes + allowed:
        problems.append(f"RSS {warm.rss_bytes / MIB:.1f} -> {now.rss_bytes / MIB:.1f} MiB")
    return problems


@pytest.mark.soak
async def test_soak_with_random_element_kills(
    tmp_path: Path,
    keypair: KeyPair,
    token: TokenFactory,
    record_property: Callable[[str, object], None],
) -> None:
    max_kills = max(3, UPLOADS // UPLOADS_PER_KILL)
    # Generous: a long soak on a loaded CI machine; the small one takes about a minute.
    with trio.fail_after(120 + 3 * UPLOADS):
        async with contextlib.AsyncExitStack() as stack:
            elements = await start_elements(stack, tmp_path, keypair, ELEMENTS)
            ingester = await serve_ingester(
                stack, tmp_path, keypair, [se.registry_entry() for se in elements], ENV
            )
            soak = Soak(ingester.url, token(), elements)
            started = trio.current_time()

            # The warm-up has the run's shape (kills included), so the pools, caches and
            # allocator arenas it leaves are what a steady state holds.
            await soak.phase(stack, SEED - 2, WARM_UP, WARM_UP_KILLS)
            await trio.sleep(1.0)
            warm = resources(ingester.pid)
            warm_stored, warm_errors = len(soak.ledger.stored), soak.ledger.errors.copy()
            soak.kills = 0

            run_started = trio.current_time()
            await soak.phase(stack, SEED, UPLOADS, max_kills)
            run_s = trio.current_time() - run_started

            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                await wait_writable(http, ingester, {se.element_id for se in elements})
                # Settled: every element back, abandoned copies removed.
                with contextlib.suppress(AssertionError):
                    await assert_no_orphans(soak.elements, soak.ledger, timeout_s=30)
                left = orphans(soak.elements, soak.ledger.expected())
                on_disk = {se.element_id: data_files(se.data_dir) for se in soak.elements}
                lost = [s for s in soak.ledger.stored if not s.files <= on_disk[s.element_id]]
                stray = sum(len(v["orphans"]) for v in left.values())
                await soak.ledger.assert_intact(http, token())

            def settled() -> bool:
                return not grown(warm, resources(ingester.pid))

            with contextlib.suppress(trio.TooSlowError):
                await eventually(settled, timeout_s=20, interval_s=0.5)
            after = resources(ingester.pid)
            took = trio.current_time() - started
            ledger = soak.ledger
            run_errors = ledger.errors - warm_errors
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(run_errors.items())) or "none"
            acked = len(ledger.stored) - warm_stored
            summary = (
                f"soak: {UPLOADS} uploads (seed {SEED}, {CONCURRENCY} clients, {ELEMENTS} "
                f"elements), {soak.kills} kills, {acked} x 201, errors: {errors}, "
                f"lost {len(lost)}, orphans {stray}; {after.fds} fds (warm-up {warm.fds}; "
                f"{after.close_wait} sockets in CLOSE_WAIT), "
                f"{after.threads} threads ({warm.threads}), RSS {after.rss_bytes / MIB:.1f} "
                f"MiB ({warm.rss_bytes / MIB:.1f}); {run_s:.0f} s of uploads, {took:.0f} s in all"
            )
            # Shown at the end of the run (tests/conftest.py), with xdist's workers too.
            record_property("summary", summary)
            assert not soak.transport_errors, soak.transport_errors
            assert not left, left
            assert spool_files(ingester) == []
            assert not grown(warm, after), (grown(warm, after), warm, after)
            assert soak.kills >= 1
            # Failovers carry uploads through kills; a long one that sees each of the three
            # elements killed under it finds none left (503), but most succeed.
            assert acked >= 0.8 * UPLOADS, summary
