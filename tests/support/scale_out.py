"""Replicas behind haproxy, with Redis under Sentinel: the scale-out world of the chaos tests.

    with scale_out(root, keys, replicas=3) as world:
        world.url                     # haproxy (what clients use)
        world.kill_replica(0)         # SIGKILL; world.start_replica(0) brings it back
        world.up()                    # the replicas haproxy has checked up
        world.redis.kill_master()     # Sentinel promotes the Redis replica

and clients that behave as the README asks: `upload_retrying` (multipart, one
`Idempotency-Key` for all its attempts, following `Retry-After`) and `tus_resuming` (asks
`HEAD` for the offset after any failure and goes on from there). Every process is a real one on
a free loopback port, stopped when the context exits.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx
import trio

from ingester.dev_replicas import servers_up
from ingester.haproxy_config import DRAIN_DELAY_S, Server, render
from tests.support.client import AsyncBody, MultipartUpload, auth, send_stream
from tests.support.fixtures import KeyPair
from tests.support.haproxy import haproxy_binary
from tests.support.processes import (
    ManagedProcess,
    StorageElementProcess,
    free_port,
    http_ok,
    start_ingester,
    start_storage_element,
)
from tests.support.redis_sentinel import SentinelRedis

# Short leases and janitor rounds, so a dead replica's work is taken over within seconds.
LEASE_S: Final = 2.0
JANITOR_S: Final = 0.3
TUS_LOCK_TTL_S: Final = 2.0
# What a client waits at most between attempts (a Retry-After above it is capped).
MAX_WAIT_S: Final = 2.0
# Statuses after which a client tries again: nothing it was told stored anything.
RETRIABLE: Final = frozenset({409, 423, 429, 502, 503, 504})


@dataclass
class World:
    root: Path
    keys: KeyPair
    redis: SentinelRedis
    elements: list[StorageElementProcess]
    spool: Path
    replica_ports: list[int]
    replicas: list[ManagedProcess | None] = field(default_factory=list)
    haproxy: ManagedProcess | None = None
    stats_url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.haproxy is not None
        return self.haproxy.url

    def name(self, index: int) -> str:
        return f"replica-{index + 1}"

    def start_replica(self, index: int) -> ManagedProcess:
        proc = start_ingester(
            self.root,
            name=self.name(index),
            public_key=self.keys.public_path,
            elements=[se.registry_entry() for se in self.elements],
            env=self.env,
            port=self.replica_ports[index],
        )
        proc.wait_ready()
        self.replicas[index] = proc
        return proc

    def replica(self, index: int) -> ManagedProcess:
        proc = self.replicas[index]
        assert proc is not None
        return proc

    def kill_replica(self, index: int) -> None:
        self.replica(index).kill()

    def up(self) -> set[str]:
        try:
            return servers_up(httpx.get(self.stats_url, timeout=2.0).text)
        except httpx.HTTPError:
            return set()

    def _files(self) -> Iterator[tuple[str, Path, str | None]]:
        """(element id, path, sha256) of every file on every element (their metadata and
        lock files aside), temporary files included; sha256 None for one the element
        removed (an aborted upload's, or one just committed under its final name) between
        listing and reading: whatever became of it shows up in the next look."""
        for se in self.elements:
            for path in se.stored_files():
                if path.name == ".lock" or path.name.endswith(".attr.json"):
                    continue
                try:
                    digest: str | None = hashlib.sha256(path.read_bytes()).hexdigest()
                except FileNotFoundError:
                    digest = None
                yield se.element_id, path, digest

    def stored(self) -> Counter[str]:
        """sha256 of every file on every element, temporary files included: a leftover of
        any kind shows up here."""
        return Counter(digest or "(vanished while read)" for _, _, digest in self._files())

    def copies_of(self, sha256: str) -> list[tuple[str, str]]:
        """(element id, file id) of every stored copy of the bytes with this sha256; the
        file id is the one the storage name ends in (`<stem>_<file_id>.<ext>`)."""
        return [
            (element_id, path.stem.rsplit("_", 1)[-1])
            for element_id, path, digest in self._files()
            if digest == sha256
        ]

    def trace(self, file_id: str, limit: int = 20) -> list[str]:
        """The log lines of every replica and element that name `file_id`, or the upload id
        a replica's line about it gives, each cut short: what happened to one copy (who sent
        it, what became of its saga), for a failed invariant's message."""
        procs: list[ManagedProcess] = [p for p in self.replicas if p is not None]
        procs += self.elements
        logs = [(proc.name, line.strip()) for proc in procs for line in proc.log_lines()]
        names = {file_id}
        for _, line in logs:
            if file_id in line:
                names.update(re.findall(r'"upload_id": "([^"]+)"', line))
        lines = [f"{name}: {line[:300]}" for name, line in logs if any(n in line for n in names)]
        return lines[:limit]

    def saga_records(self) -> int:
        """Upload sagas not finished yet, on the current master."""
        port = self.redis.master_port()
        assert port is not None
        client = self.redis.node_on(port).client()
        try:
            index = {b"ingester:saga:due", b"ingester:saga:compensating"}
            return sum(1 for key in client.scan_iter("ingester:saga:*") if key not in index)
        finally:
            client.close()

    def stop(self) -> None:
        for proc in [self.haproxy, *self.replicas]:
            if proc is not None:
                proc.kill()


@contextmanager
def scale_out(root: Path, keys: KeyPair, *, replicas: int = 3, **env: str) -> Iterator[World]:
    haproxy_binary()
    with ExitStack() as stack:
        redis = stack.enter_context(SentinelRedis(root / "redis"))
        elements: list[StorageElementProcess] = []
        stack.callback(lambda: [se.terminate() for se in elements])
        for element_id in ("se-a", "se-b"):
            elements.append(
                start_storage_element(
                    root, element_id=element_id, mode="edit", public_key=keys.public_path
                )
            )
        spool = root / "shared-spool"
        world = World(
            root,
            keys,
            redis,
            elements,
            spool,
            replica_ports=[free_port() for _ in range(replicas)],
            replicas=[None] * replicas,
        )
        world.env = {
            "INGESTER_REDIS_URL": redis.url,
            "INGESTER_REDIS_TIMEOUT_S": "0.5",
            "INGESTER_SPOOL_DIR": str(spool),
            "INGESTER_SAGA_LEASE_S": str(LEASE_S),
            "INGESTER_SAGA_JANITOR_INTERVAL_S": str(JANITOR_S),
            "INGESTER_COMPENSATION_BACKOFF_MAX_S": "0.5",
            "INGESTER_TUS_LOCK_TTL_S": str(TUS_LOCK_TTL_S),
            "INGESTER_TUS_LOCK_WAIT_S": "4",
            "INGESTER_SHUTDOWN_GRACE_S": "10",
            "INGESTER_DRAIN_DELAY_S": str(DRAIN_DELAY_S),
            "INGESTER_RETRY_AFTER_S": "1",
            "INGESTER_SE_STALL_TIMEOUT_S": "5",
            **env,
        }
        stack.callback(world.stop)
        for index in range(replicas):
            world.start_replica(index)
        port, stats_port = free_port(), free_port()
        config = root / "haproxy.cfg"
        config.write_text(
            render(
                f"127.0.0.1:{port}",
                [
                    Server(world.name(i), f"127.0.0.1:{p}")
                    for i, p in enumerate(world.replica_ports)
                ],
                stats_bind=f"127.0.0.1:{stats_port}",
            )
        )
        url = f"http://127.0.0.1:{port}"
        world.haproxy = ManagedProcess(
            [haproxy_binary(), "-db", "-f", str(config)],
            name="haproxy",
            cwd=root,
            log_path=root / "haproxy.log",
            url=url,
            ready=http_ok(url + "/health/live"),
        ).start()
        world.stats_url = f"http://127.0.0.1:{stats_port}/stats;csv"
        names = {world.name(i) for i in range(replicas)}
        wait_until(lambda: world.up() == names, timeout_s=15, what="haproxy checks replicas up")
        yield world


def wait_until(check: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    """Sync polling with a deadline, for fixtures (tests use `eventually`)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(0.05)


# --- clients -------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the clients saw: every file they were told is stored, and every retry."""

    stored: dict[str, str] = field(default_factory=dict)  # sha256 sent -> file_id
    retries: Counter[str] = field(default_factory=Counter)  # why -> how many
    failures: list[str] = field(default_factory=list)  # gave up: must stay empty

    def retry(self, why: str) -> None:
        self.retries[why] += 1


def wait_s(response: httpx.Response | None, rng: random.Random) -> float:
    """How long to wait before the next attempt: `Retry-After` (capped), else a short jitter."""
    if response is not None and "Retry-After" in response.headers:
        try:
            return min(float(response.headers["Retry-After"]), MAX_WAIT_S)
        except ValueError:
            pass
    return 0.1 + rng.random() * 0.2


def why(response: httpx.Response) -> str:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = ""
    return f"{response.status_code} {code}".strip()


async def upload_retrying(
    http: httpx.AsyncClient,
    url: str,
    token: str,
    data: bytes,
    ledger: Ledger,
    *,
    key: str,
    piece: int = 64 * 1024,
    pace_s: float = 0.0,
) -> None:
    """A multipart upload of `data` that retries with the same `Idempotency-Key` until stored.

    With `pace_s`, each `piece` of the body is followed by that pause, so the upload is in
    flight long enough to be hit by what the test breaks."""
    rng = random.Random(key)
    sha = hashlib.sha256(data).hexdigest()
    while True:
        upload = MultipartUpload(
            (data[i : i + piece] for i in range(0, len(data), piece)), filename=f"{key}.bin"
        )
        headers = auth(
            token,
            **{
                "Content-Type": upload.content_type,
                "Transfer-Encoding": "chunked",
                "Idempotency-Key": key,
            },
        )
        response: httpx.Response | None = None
        try:
            response = await send_stream(
                http,
                "POST",
                url + "/api/v1/files/upload",
                PacedParts(upload.parts(), pace_s),
                headers,
            )
        except httpx.TransportError as exc:
            ledger.retry(type(exc).__name__)
        else:
            if response.status_code == 201:
                body = response.json()
                assert body["checksum"] == sha, body
                ledger.stored[sha] = body["file_id"]
                return
            if response.status_code not in RETRIABLE:
                ledger.failures.append(f"{key}: {why(response)} {response.text[:200]}")
                return
            ledger.retry(why(response))
        await trio.sleep(wait_s(response, rng))


class PacedParts(httpx.AsyncByteStream):
    """A body's parts with a pause after each (class-based: no ResourceWarning on a cut)."""

    def __init__(self, parts: Iterator[bytes], pace_s: float) -> None:
        self._parts = parts
        self._pace_s = pace_s

    def __aiter__(self) -> PacedParts:
        return self

    async def __anext__(self) -> bytes:
        try:
            part = next(self._parts)
        except StopIteration:
            raise StopAsyncIteration from None
        if self._pace_s:
            await trio.sleep(self._pace_s)
        return part


async def tus_resuming(
    http: httpx.AsyncClient,
    url: str,
    token: str,
    data: bytes,
    ledger: Ledger,
    *,
    chunk: int = 128 * 1024,
    name: str = "tus",
) -> None:
    """A tus upload that, after any failure, asks `HEAD` where to go on from."""
    rng = random.Random(name)
    sha = hashlib.sha256(data).hexdigest()
    headers = {**auth(token), "Tus-Resumable": "1.0.0"}
    location: str | None = None
    offset = 0
    while True:
        response: httpx.Response | None = None
        try:
            if location is None:
                response = await http.post(
                    url + "/api/v1/uploads",
                    headers={**headers, "Upload-Length": str(len(data))},
                )
                if response.status_code == 201:
                    location = url + response.headers["Location"]
                    offset = 0
                    continue
            else:
                piece = data[offset : offset + chunk]
                # A class-based body: httpx's own generator for `content=bytes` is left
                # unfinished when the replica dies mid-write, and warns when collected.
                response = await send_stream(
                    http,
                    "PATCH",
                    location,
                    AsyncBody(iter([piece])),
                    {
                        **headers,
                        "Upload-Offset": str(offset),
                        "Content-Type": "application/offset+octet-stream",
                        "Content-Length": str(len(piece)),
                    },
                )
                if response.status_code == 204:
                    offset = int(response.headers["Upload-Offset"])
                    if offset == len(data):
                        ledger.stored[sha] = response.headers["Upload-File-Id"]
                        return
                    continue
        except httpx.TransportError as exc:
            ledger.retry(f"tus {type(exc).__name__}")
        if response is not None:
            if response.status_code not in (*RETRIABLE, 409):
                ledger.failures.append(f"{name}: {why(response)} {response.text[:200]}")
                return
            ledger.retry(f"tus {why(response)}")
        await trio.sleep(wait_s(response, rng))
        if location is not None:
            resumed = await _resume_offset(http, location, headers, rng)
            if resumed is None:
                # The upload is gone (its creation was lost): start again.
                ledger.retry("tus lost, created again")
                location = None
            else:
                offset = resumed


async def _resume_offset(
    http: httpx.AsyncClient, location: str, headers: dict[str, str], rng: random.Random
) -> int | None:
    """The server's offset, asked until a replica answers; None when the upload is gone."""
    while True:
        head: httpx.Response | None = None
        try:
            head = await http.head(location, headers=headers)
            if head.status_code == 200:
                return int(head.headers["Upload-Offset"])
            if head.status_code in (404, 410):
                return None
        except httpx.TransportError:
            pass
        await trio.sleep(wait_s(head, rng))
