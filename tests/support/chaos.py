"""Helpers of the chaos suite (`tests/chaos/`): uploads whose pace the test controls, the
invariant checks, and what a soak watches in the ingester process.

The invariant every chaos test checks: each upload ends `201` with the file intact on the
element its answer names (downloaded from there and hashed), or with a clear error; and once
the elements are back, their data directories hold the acknowledged files and nothing else
(no data file or attr.json of another upload, no temporary file).

    ledger = Ledger()
    ledger.add(response, body)                        # 201 or a clear error, checked
    await ledger.assert_intact(http, token)           # every acknowledged file, downloaded
    await assert_no_orphans(elements, ledger)         # data directories == acknowledged files
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import random
import re
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import brotli
import httpx
import psutil
import redis
import trio

from tests.support.client import (
    MIB,
    MultipartUpload,
    auth,
    post_upload,
    random_chunks,
    text_chunks,
)
from tests.support.fault_proxy import FaultProxy, serve_fault_proxy
from tests.support.fixtures import KeyPair
from tests.support.processes import (
    LOOPBACK,
    IngesterProcess,
    ManagedProcess,
    StorageElementProcess,
    start_ingester,
    start_storage_element,
)
from tests.support.waiting import eventually

# The element's lock file is its own, not an upload's.
LOCK_FILE: Final = ".lock"
# Fields first, no compression: one pass, no spool, the bytes stored are the bytes sent.
PLAIN: Final = (("retention_policy", "temporary"), ("compress", "false"))
REGISTRY_KEY: Final = "artstore:storage_elements"
DISCOVERY_CHANNEL: Final = "artstore:service_discovery"


class HasDataDir(Protocol):
    """A Storage Element process of either helper family (`processes` or `stack`)."""

    @property
    def element_id(self) -> str: ...

    @property
    def data_dir(self) -> Path: ...


# --- uploads ------------------------------------------------------------------------------


def late_writing_artstore(
    root: Path, keys: KeyPair, *, element_id: str, mode: str, write_delay_s: float
) -> StorageElementProcess:
    """artStore's element (the reference element's emulation of it) writing each file
    `write_delay_s` after the body's last byte, and finishing it whoever hung up; JSON logs."""
    return start_storage_element(
        root,
        element_id=element_id,
        mode=mode,
        public_key=keys.public_path,
        artstore_compat=True,
        extra_args=("--artstore-write-delay-s", str(write_delay_s), "--log-format", "json"),
    )


def artstore_ingester_env(service_token: str, recheck_s: float = 20) -> dict[str, str]:
    """An ingester toward artStore's elements: a service account's token (they take no
    caller's), and a short landing window (`INGESTER_SAGA_RECHECK_S`) for a test."""
    return {
        "INGESTER_SE_AUTH": "static",
        "INGESTER_SE_TOKEN": service_token,
        "INGESTER_SAGA_RECHECK_S": str(recheck_s),
    }


def log_events(proc: ManagedProcess, event: str) -> list[dict[str, Any]]:
    """The process's JSON log lines of `event`."""
    return [
        line
        for text in proc.log_lines()
        if text.startswith("{") and (line := json.loads(text)).get("event") == event
    ]


def upload_of(
    size: int,
    *,
    seed: int,
    compress: str | None = None,
    fields: Sequence[tuple[str, str]] = PLAIN,
) -> MultipartUpload:
    """A temporary upload of `size` bytes: random bytes sent with `fields`, or log-like text
    with compression asked for (`compress`: `gzip` or `brotli`), which the ingester then
    stores compressed."""
    if compress is None:
        return MultipartUpload(random_chunks(size, seed=seed), fields=fields)
    return MultipartUpload(
        text_chunks(size),
        fields=[
            ("retention_policy", "temporary"),
            ("compress", "true"),
            ("compression_algorithm", compress),
        ],
        filename="app.log",
        file_content_type="text/plain",
    )


class PacedBody(httpx.AsyncByteStream):
    """A multipart body sent at a pace the test controls.

    At most `bytes_per_s` (in pieces of `piece` bytes), and, with `hold_at`, it stops once
    that many bytes are out until `release()`. `sent` counts the bytes handed to httpx;
    `holding` is set while it waits.
    """

    def __init__(
        self,
        upload: MultipartUpload,
        *,
        bytes_per_s: float | None = None,
        hold_at: int | None = None,
        piece: int = 64 * 1024,
    ) -> None:
        self._parts = upload.parts()
        self._bytes_per_s = bytes_per_s
        self._hold_at = hold_at
        self._piece = piece
        self._rest = b""
        self._released = trio.Event()
        self.holding = trio.Event()
        self.sent = 0

    def release(self) -> None:
        self._released.set()

    def __aiter__(self) -> PacedBody:
        return self

    async def __anext__(self) -> bytes:
        if self._hold_at is not None and self.sent >= self._hold_at:
            self.holding.set()
            await self._released.wait()
        if not self._rest:
            try:
                self._rest = next(self._parts)
            except StopIteration:
                raise StopAsyncIteration from None
        limit = self._piece
        if self._hold_at is not None and self.sent < self._hold_at:
            limit = min(limit, self._hold_at - self.sent)
        out, self._rest = self._rest[:limit], self._rest[limit:]
        if self._bytes_per_s is not None:
            await trio.sleep(len(out) / self._bytes_per_s)
        self.sent += len(out)
        return out


def upload_headers(token: str, body: MultipartUpload, **extra: str) -> dict[str, str]:
    return auth(
        token, **{"Content-Type": body.content_type, "Transfer-Encoding": "chunked", **extra}
    )


async def post_paced(
    http: httpx.AsyncClient,
    base_url: str,
    token: str,
    body: MultipartUpload,
    paced: PacedBody,
    **headers: str,
) -> httpx.Response:
    """POST `body` through `paced` (built on the same `body`) to the ingester."""
    request = http.build_request(
        "POST", base_url + "/api/v1/files/upload", headers=upload_headers(token, body, **headers)
    )
    request.stream = paced
    request.headers.pop("Content-Length", None)
    return await http.send(request)


@dataclass(frozen=True)
class Run:
    """One upload of `Traffic`: when it started (trio clock) and where it was stored."""

    started: float
    element_id: str | None  # None: it failed (see the ledger's errors)


class Traffic:
    """Uploads back to back from `workers` tasks until `stop()`, each of a random size in
    `sizes`; every answer goes through the ledger's checks.

        async with trio.open_nursery() as nursery:
            await nursery.start(traffic.run)
            ...                                    # break things
            await traffic.halt()                   # then look at traffic.runs, .ledger
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        workers: int = 3,
        sizes: tuple[int, int] = (64 * 1024, 2 * MIB),
        seed: int = 0,
    ) -> None:
        self.url = url
        self.token = token
        self.workers = workers
        self.sizes = sizes
        self.ledger = Ledger()
        self.runs: list[Run] = []
        self._rng = random.Random(seed)
        self._stopped = trio.Event()
        self._finished = trio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def halt(self) -> None:
        """Stop, and wait until the uploads in flight have their answers."""
        self.stop()
        await self._finished.wait()

    def started_between(self, start: float, end: float = math.inf) -> list[Run]:
        return [run for run in self.runs if start <= run.started < end]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with (
                httpx.AsyncClient(trust_env=False, timeout=60) as http,
                trio.open_nursery() as nursery,
            ):
                for _ in range(self.workers):
                    nursery.start_soon(self._worker, http)
                task_status.started()
        finally:
            self._finished.set()

    async def _worker(self, http: httpx.AsyncClient) -> None:
        while not self._stopped.is_set():
            body = upload_of(self._rng.randint(*self.sizes), seed=self._rng.randrange(1 << 30))
            started = trio.current_time()
            stored = self.ledger.add(await post_upload(http, self.url, self.token, body), body)
            self.runs.append(Run(started, stored.element_id if stored else None))


# --- the invariant ------------------------------------------------------------------------


def error_code(response: httpx.Response) -> str | None:
    try:
        payload = response.json()
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def assert_clear_error(response: httpx.Response) -> str:
    """A failed upload's answer is a clear one: JSON error with an upper-case code and a
    message, the request id, and `Retry-After` on 503. Returns the code."""
    assert response.status_code >= 400, response.text
    code = error_code(response)
    assert code is not None, response.text
    assert re.fullmatch(r"[A-Z][A-Z0-9_]+", code), response.text
    assert response.json()["error"]["message"], response.text
    assert response.headers.get("X-Request-ID"), response.headers
    assert "Traceback" not in response.text
    if response.status_code in (429, 503):
        assert int(response.headers["Retry-After"]) > 0, response.headers
    return code


@dataclass(frozen=True)
class Stored:
    """An acknowledged upload: what its 201 said, and the sha256 of what was sent."""

    file_id: str
    # None when the element did not say (artStore's element: see `files`).
    storage_filename: str | None
    element_id: str
    element_url: str
    sha256: str
    size: int
    compression: str | None

    @classmethod
    def of(cls, response: httpx.Response, body: MultipartUpload) -> Stored:
        assert response.status_code == 201, response.text
        result = response.json()
        assert result["checksum"] == body.sha256, (result, body.sha256)
        assert result["file_size"] == body.size, (result, body.size)
        return cls(
            file_id=result["file_id"],
            storage_filename=result["storage_filename"],
            element_id=result["storage_element_id"],
            element_url=result["storage_element_url"],
            sha256=body.sha256,
            size=body.size,
            compression=result["compression_algorithm"] if result["compressed"] else None,
        )

    @property
    def files(self) -> set[str]:
        """What it leaves in its element's data directory: the data and its attr.json. Without
        the element's name for it, a pattern: the two files whose names hold its id (the
        reference element's naming, in both of its modes)."""
        if self.storage_filename is None:
            return {f"*{self.file_id}*"}
        return {self.storage_filename, self.storage_filename + ".attr.json"}


@dataclass
class Ledger:
    """Every upload's end: the acknowledged files, and the errors by status and code."""

    stored: list[Stored] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, response: httpx.Response, body: MultipartUpload) -> Stored | None:
        if response.status_code == 201:
            stored = Stored.of(response, body)
            self.stored.append(stored)
            return stored
        code = assert_clear_error(response)
        self.errors[f"{response.status_code} {code}"] += 1
        return None

    def expected(self) -> dict[str, set[str]]:
        by_element: dict[str, set[str]] = {}
        for stored in self.stored:
            by_element.setdefault(stored.element_id, set()).update(stored.files)
        return by_element

    async def assert_intact(self, http: httpx.AsyncClient, token: str) -> None:
        for stored in self.stored:
            await assert_intact(http, stored, token)


async def download_sha256(
    http: httpx.AsyncClient, element_url: str, file_id: str, token: str, compression: str | None
) -> tuple[str, int]:
    """sha256 and size of a stored file's original bytes, read back from its element."""
    digest = hashlib.sha256()
    size = 0
    decompress: Any = None
    if compression == "brotli":
        decompress = brotli.Decompressor().process
    elif compression == "gzip":
        decompress = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    async with http.stream(
        "GET", f"{element_url}/api/v1/files/{file_id}/download", headers=auth(token)
    ) as response:
        assert response.status_code == 200, (element_url, file_id, response.status_code)
        async for chunk in response.aiter_bytes():
            data = decompress(chunk) if decompress is not None else chunk
            digest.update(data)
            size += len(data)
    return digest.hexdigest(), size


async def assert_intact(http: httpx.AsyncClient, stored: Stored, token: str) -> None:
    """Downloaded from the element its 201 named: the same bytes as were sent."""
    sha256, size = await download_sha256(
        http, stored.element_url, stored.file_id, token, stored.compression
    )
    assert (sha256, size) == (stored.sha256, stored.size), f"{stored}: got {sha256}, {size} B"


def data_files(data_dir: Path) -> set[str]:
    """Every file in an element's data directory, temporary ones included, relative."""
    if not data_dir.exists():
        return set()
    return {
        p.relative_to(data_dir).as_posix()
        for p in data_dir.rglob("*")
        if p.is_file() and p.name != LOCK_FILE
    }


def orphans(
    elements: Iterable[HasDataDir], expected: Mapping[str, set[str]]
) -> dict[str, dict[str, list[str]]]:
    """Per element, the files that should not be there and the acknowledged ones missing."""
    out: dict[str, dict[str, list[str]]] = {}
    for element in elements:
        want = expected.get(element.element_id, set())
        have = data_files(element.data_dir)
        patterns = {w for w in want if "*" in w}
        exact = want - patterns
        # A pattern stands for a data file and its attr.json (see `Stored.files`).
        matched = {p: {h for h in have if fnmatch.fnmatchcase(h, p)} for p in patterns}
        extra = have - exact - set().union(*matched.values())
        missing = (exact - have) | {p for p, hits in matched.items() if len(hits) != 2}
        if extra or missing:
            out[element.element_id] = {"orphans": sorted(extra), "missing": sorted(missing)}
    return out


def snapshot(elements: Iterable[HasDataDir]) -> dict[str, set[str]]:
    """Each element's files now: the baseline of a test on elements shared with others."""
    return {element.element_id: data_files(element.data_dir) for element in elements}


async def assert_no_orphans(
    elements: Iterable[HasDataDir],
    ledger: Ledger | None = None,
    *,
    baseline: Mapping[str, set[str]] | None = None,
    timeout_s: float = 15.0,
) -> None:
    """The data directories come to hold exactly `baseline` plus the acknowledged files (an
    abandoned request's temporary file goes a moment after the upload's answer; a
    compensation may be retried for a while)."""
    elements = list(elements)
    expected = {key: set(files) for key, files in (baseline or {}).items()}
    for key, files in (ledger.expected() if ledger is not None else {}).items():
        expected.setdefault(key, set()).update(files)
    with contextlib.suppress(trio.TooSlowError):
        await eventually(lambda: not orphans(elements, expected), timeout_s=timeout_s)
    left = orphans(elements, expected)
    assert not left, f"data directories differ from the acknowledged files: {left}"


def spool_files(ingester: IngesterProcess) -> list[Path]:
    """Whatever is left in an ingester's spool directory, but the finished tus uploads'
    data files it keeps for the next uploads (`tus/.reuse`, see `idle_tus_files`)."""
    spool = ingester.spool_dir
    if not spool.exists():
        return []
    idle = spool / "tus" / ".reuse"
    return sorted(p for p in spool.rglob("*") if p != idle and idle not in p.parents)


def idle_tus_files(ingester: IngesterProcess) -> list[Path]:
    """The finished tus uploads' data files kept for the next uploads."""
    idle = ingester.spool_dir / "tus" / ".reuse"
    return sorted(idle.iterdir()) if idle.exists() else []


# --- processes ----------------------------------------------------------------------------


async def start_elements(
    stack: contextlib.AsyncExitStack,
    tmp_path: Path,
    keypair: KeyPair,
    count: int,
    *,
    mode: str = "edit",
    prefix: str = "se",
    extra_args: Sequence[str] = (),
) -> list[StorageElementProcess]:
    """`count` elements `se-1`, `se-2`... (one after another: they share two cores);
    `extra_args` such as `--artstore-compat` go to each."""
    return [
        await stack.enter_async_context(
            StorageElementProcess(
                tmp_path,
                mode=mode,
                public_key=keypair.public_path,
                element_id=f"{prefix}-{n}",
                extra_args=extra_args,
            )
        )
        for n in range(1, count + 1)
    ]


async def restart_element(se: StorageElementProcess) -> StorageElementProcess:
    """The same element again after a kill: same id, mode, port and data directory (its
    owner still stops it). At start it removes a killed run's leftovers (see the README on
    the reference element)."""
    return await trio.to_thread.run_sync(se.start)


async def serve_ingester(
    stack: contextlib.AsyncExitStack,
    tmp_path: Path,
    keypair: KeyPair,
    elements: list[dict[str, object]],
    env: dict[str, str] | None = None,
    *,
    name: str = "ingester",
) -> IngesterProcess:
    """An ingester over `elements`, ready, stopped when `stack` closes."""
    ingester = await trio.to_thread.run_sync(
        lambda: start_ingester(
            tmp_path, name=name, public_key=keypair.public_path, elements=elements, env=env
        )
    )

    async def stop() -> None:
        # Shielded: it must run when the test failed on a deadline too.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(ingester.terminate)

    stack.push_async_callback(stop)
    await trio.to_thread.run_sync(ingester.wait_ready)
    return ingester


@asynccontextmanager
async def behind_proxy(
    tmp_path: Path,
    keypair: KeyPair,
    proxied: StorageElementProcess,
    direct: StorageElementProcess,
    env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[FaultProxy, IngesterProcess]]:
    """A fault proxy in front of `proxied`, and an ingester that prefers `proxied` (through
    the proxy) to `direct`. Probes run only when a failure asks for one (unless `env` says
    otherwise), so a fault set on the proxy meets uploads, not probes."""
    port = int(proxied.url.rsplit(":", 1)[1])
    settings = {"INGESTER_SE_PROBE_INTERVAL_S": "60", **(env or {})}
    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(serve_fault_proxy, LOOPBACK, port)
        async with contextlib.AsyncExitStack() as stack:
            entries: list[dict[str, object]] = [
                {"id": proxied.element_id, "api_url": proxy.url, "mode": "edit", "priority": 1},
                direct.registry_entry(priority=2),
            ]
            yield proxy, await serve_ingester(stack, tmp_path, keypair, entries, settings)
        nursery.cancel_scope.cancel()


def temporary_sizes(se: HasDataDir) -> list[int]:
    """Sizes of the uploads the element is writing (its `.tmp/` files)."""
    sizes = []
    with contextlib.suppress(FileNotFoundError):
        for path in (se.data_dir / ".tmp").iterdir():
            with contextlib.suppress(FileNotFoundError):
                sizes.append(path.stat().st_size)
    return sizes


async def receiving(se: HasDataDir, at_least: int = 0, timeout_s: float = 30) -> None:
    """Until the element writes an upload of at least `at_least` bytes under `.tmp/`."""

    def check() -> bool:
        return any(size >= at_least for size in temporary_sizes(se))

    await eventually(check, timeout_s=timeout_s, interval_s=0.005)


async def readiness(
    http: httpx.AsyncClient, ingester: ManagedProcess
) -> tuple[int, dict[str, Any]]:
    response = await http.get(ingester.url + "/health/ready")
    return response.status_code, response.json()


async def wait_writable(
    http: httpx.AsyncClient, ingester: ManagedProcess, element_ids: set[str], timeout_s: float = 15
) -> None:
    """Until the ingester's readiness lists exactly `element_ids` as writable."""
    last: dict[str, Any] = {}
    with trio.move_on_after(timeout_s):
        while True:
            _, last = await readiness(http, ingester)
            if set(last["writable_storage_elements"]) == element_ids:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"writable never became {sorted(element_ids)}: {last}")


# --- Redis registry, as the Admin Module writes it ------------------------------------------


def write_registry(redis_url: str, elements: Sequence[dict[str, object]], version: int) -> None:
    """The contract's registry document under its key, then the change announced."""
    entries = [
        {
            "id": e["id"],
            "element_id": e["id"],
            "name": e["id"],
            "api_url": e["api_url"],
            "mode": e["mode"],
            "status": e.get("status", "online"),
            "priority": e.get("priority", 100),
            "is_writable": e["mode"] in ("edit", "rw"),
            "is_available": True,
        }
        for e in elements
    ]
    document = {
        "version": version,
        "timestamp": time.time(),
        "count": len(entries),
        "storage_elements": entries,
    }
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        client.set(REGISTRY_KEY, json.dumps(document))
        client.publish(DISCOVERY_CHANNEL, str(version))
    finally:
        client.close()


# --- the ingester process, from the outside --------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What a process holds: descriptors by kind, threads, resident memory."""

    files: tuple[str, ...]  # regular files open
    sockets: int
    # TCP connections whose peer has closed and that this process has not: a socket leak
    # once the process has settled (its pool drops such connections on its next use).
    close_wait: int
    other_fds: int  # pipes, eventfds, epoll...
    threads: int
    rss_bytes: int

    @property
    def fds(self) -> int:
        return len(self.files) + self.sockets + self.other_fds


def resources(pid: int) -> Resources:
    files: list[str] = []
    sockets = other = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except FileNotFoundError:
            continue  # closed while we looked
        if target.startswith("socket:"):
            sockets += 1
        elif target.startswith("/"):
            files.append(target)
        else:
            other += 1
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    connections = psutil.Process(pid).net_connections(kind="tcp")
    return Resources(
        files=tuple(sorted(files)),
        sockets=sockets,
        close_wait=sum(1 for c in connections if c.status == psutil.CONN_CLOSE_WAIT),
        other_fds=other,
        threads=int(status["Threads"].strip()),
        rss_bytes=int(status["VmRSS"].split()[0]) * 1024,
    )
