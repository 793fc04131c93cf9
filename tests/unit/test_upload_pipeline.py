"""The upload pipeline built from its parts, with no server and no process: a form body fed
in chunks, a saga book on the in-process store, and elements answering through an httpx
transport in this process that keeps what it is sent (and can fail the way a real element
does). Time is trio's `MockClock` (see `clock`), so retry backoffs cost nothing.

What a user would check: the bytes the element keeps are the bytes sent (sha256), a late
field that changes the plan stores the file where the plan says, a failover mid-stream
leaves one copy, and nothing is left on an element after a failure."""

from __future__ import annotations

import gzip
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import brotli
import httpx
import pytest
import trio
import trio.testing

from ingester.auth.principal import Principal
from ingester.concurrency import collapse
from ingester.errors import (
    IntegrityError,
    NoStorageAvailable,
    StorageElementRejected,
    StorageElementUnavailable,
)
from ingester.metrics import Metrics
from ingester.resilience.breaker import BreakerBoard, BreakerPolicy, BreakerState
from ingester.resilience.retry import RetryPolicy
from ingester.saga.book import SagaBook
from ingester.saga.store import MemorySagaStore
from ingester.settings import Settings
from ingester.storage.client import StorageElementClient
from ingester.storage.pool import ElementPool
from ingester.storage.registry import Registry, configured_elements
from ingester.storage.se_auth import build_se_token_provider
from ingester.storage.vectored import Pieces
from ingester.upload.budget import MemoryBudget, UploadBudget
from ingester.upload.fields import parse_upload_fields
from ingester.upload.form import FormReader, FormSource
from ingester.upload.pipeline import UploadPipeline
from ingester.upload.progress import ProgressBook
from ingester.upload.records import UploadRequest
from ingester.upload.source import BytesSource, FileSource, FileStart
from ingester.upload.spool import Spool, SpoolBudget, SpoolFiles
from tests.support.multipart import parse_form

if TYPE_CHECKING:
    from hashlib import _Hash

MIB = 1024 * 1024
BOUNDARY = "test-boundary-0123456789"
ELEMENTS = {"se-a": ("edit", 1), "se-b": ("edit", 2), "se-r": ("rw", 1)}
# How long an element sent a whole body it never answered may still store it (virtual s).
RECHECK_S = 120


@dataclass
class Element:
    """One fake element: the files it keeps, and how it fails next."""

    files: dict[str, bytes] = field(default_factory=dict)
    # Refuse connections (as a dead element does).
    down: bool = False
    # Reset the connection once this many body bytes have arrived.
    reset_after: int | None = None
    removed: list[str] = field(default_factory=list)
    # Answer uploads with this status (and a FastAPI-shaped body) after reading them.
    refuse: int | None = None
    # Removals wait for this (a slow network: one may land long after it was sent).
    delete_gate: trio.Event | None = None
    # How each upload request's body was framed: its Content-Length, or "chunked"; and the
    # bytes that came.
    framing: list[tuple[str, int]] = field(default_factory=list)
    # As artStore's element: the file is written after the last byte, once this is set, and
    # the write goes on whether or not the caller is still there (`body_in` is set first).
    write_gate: trio.Event | None = None
    body_in: trio.Event = field(default_factory=trio.Event)
    # Called as the file is stored, before the 201 goes back (what else happens then).
    on_stored: Callable[[], None] | None = None


class Elements(httpx.AsyncBaseTransport):
    """Storage Elements in this process: `POST /api/v1/files/upload` reads the streamed form
    and keeps its file; `DELETE /api/v1/gc/{id}` removes it."""

    def __init__(self) -> None:
        self.by_port = {port: name for port, name in enumerate(ELEMENTS, start=1)}
        self.elements = {name: Element() for name in ELEMENTS}
        # Where writes that outlive their request run (`Element.write_gate`).
        self.background: trio.Nursery | None = None

    def __getitem__(self, name: str) -> Element:
        return self.elements[name]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        element = self.elements[self.by_port[request.url.port or 0]]
        if element.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.method == "DELETE":
            if element.delete_gate is not None:
                await element.delete_gate.wait()
            file_id = request.url.path.rsplit("/", 1)[1]
            element.removed.append(file_id)
            if element.files.pop(file_id, None) is None:
                return httpx.Response(404, json={"detail": "not found"})
            return httpx.Response(200, json={"file_id": file_id, "status": "deleted"})
        assert request.url.path == "/api/v1/files/upload"
        received = bytearray()
        framing = request.headers.get("Content-Length") or request.headers["Transfer-Encoding"]
        element.framing.append((framing, 0))
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for chunk in request.stream:
            # The body hands out a batch's reads unjoined (`Pieces`), which httpcore's
            # patched send writes as they are; this stand-in for httpcore joins them.
            piece: object = chunk
            received += piece.joined() if isinstance(piece, Pieces) else chunk
            if element.reset_after is not None and len(received) >= element.reset_after:
                element.reset_after = None
                raise httpx.ReadError("connection reset by peer", request=request)
        element.framing[-1] = (element.framing[-1][0], len(received))
        if element.refuse is not None:
            return httpx.Response(element.refuse, json={"detail": "Invalid token"})
        fields, data = parse_form(bytes(received), request.headers["Content-Type"])
        if element.write_gate is not None:
            written = trio.Event()

            async def write(gate: trio.Event) -> None:
                await gate.wait()
                element.files[fields["file_id"]] = data
                written.set()

            assert self.background is not None
            self.background.start_soon(write, element.write_gate)
            element.body_in.set()
            await written.wait()
        else:
            element.files[fields["file_id"]] = data
        if element.on_stored is not None:
            element.on_stored()
        return httpx.Response(
            201,
            json={
                "file_id": fields["file_id"],
                "file_size": len(data),
                "checksum": hashlib.sha256(data).hexdigest(),
                "storage_filename": fields["file_id"],
            },
        )


def form(fields_before: dict[str, str], data: bytes, fields_after: dict[str, str]) -> bytes:
    def field_part(name: str, value: str) -> bytes:
        return (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()

    return b"".join(
        [
            *(field_part(k, v) for k, v in fields_before.items()),
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            'filename="report.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode(),
            data,
            b"\r\n",
            *(field_part(k, v) for k, v in fields_after.items()),
            f"--{BOUNDARY}--\r\n".encode(),
        ]
    )


class Chunks:
    """A request body arriving in pieces (an iterator, not a generator: nothing to finalize
    when the pipeline stops reading early)."""

    def __init__(self, body: bytes, size: int = 64 * 1024) -> None:
        self._body = body
        self._size = size
        self._at = 0

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self._at >= len(self._body):
            raise StopAsyncIteration
        piece = self._body[self._at : self._at + self._size]
        self._at += len(piece)
        return piece


class HashingReader(Chunks):
    """1 MiB pieces of `body`, each fed to `hasher` as it is handed over (a data file reader
    does that in the worker thread that read it)."""

    def __init__(self, body: bytes, hasher: _Hash) -> None:
        super().__init__(body, MIB)
        self._hasher = hasher

    async def __anext__(self) -> bytes:
        piece = await super().__anext__()
        self._hasher.update(piece)
        return piece


@dataclass
class World:
    pipeline: UploadPipeline
    elements: Elements
    sagas: SagaBook
    store: MemorySagaStore
    settings: Settings
    metrics: Metrics
    memory: MemoryBudget

    async def upload_read(
        self, data: bytes, hasher: _Hash, fields: dict[str, str] | None = None
    ) -> dict[str, object]:
        """`data` as a file read from disk is: whole (its options, `fields`, checked
        beforehand; its size known), in 1 MiB pieces, hashed by its reader (`hasher`,
        handed to the pipeline as `prehashed`)."""
        upload_id = str(uuid.uuid4())
        source = BytesSource(
            HashingReader(data, hasher),
            FileStart(
                parse_upload_fields(fields or {"compress": "false"}, max_description_length=1000),
                settled=True,
                filename="report.bin",
                content_type="application/octet-stream",
                final=True,
            ),
            idle_timeout_s=self.settings.client_idle_timeout_s,
            budget=UploadBudget(self.memory),
            quantum=self.settings.body_buffer_limit,
            prehashed=hasher,
        )
        return await self._run(upload_id, source, len(data), file_size=len(data))

    async def upload(self, body: bytes) -> dict[str, object]:
        upload_id = str(uuid.uuid4())
        reader = FormReader(
            Chunks(body),
            BOUNDARY.encode(),
            self.settings.client_idle_timeout_s,
            UploadBudget(self.memory),
            quantum=self.settings.body_buffer_limit,
        )
        source = FormSource(reader, max_description_length=1000)
        return await self._run(upload_id, source, len(body))

    async def _run(
        self, upload_id: str, source: FileSource, length: int, *, file_size: int | None = None
    ) -> dict[str, object]:
        progress = ProgressBook(60).start(upload_id, "alice", length)
        request = UploadRequest(
            upload_id=upload_id,
            principal=ALICE,
            content_length=length,
            expected_digest=None,
            file_size=file_size,
        )
        try:
            return await self.pipeline.run(request, source, progress)
        finally:
            source.budget.release_all()


ALICE = Principal(
    subject="alice",
    username="alice",
    roles=frozenset({"uploader"}),
    scopes=frozenset(),
    token_type="access",
    client_id=None,
    raw_token="t",
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps only once every task has been blocked for a while in real
    time: hashing and spool writes run in worker threads, and a clock that jumped whenever
    the loop waited for one would fire the stall watchdog in the middle of a hash."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    elements = [
        {"id": name, "api_url": f"http://127.0.0.1:{port}", "mode": mode, "priority": priority}
        for port, (name, (mode, priority)) in enumerate(ELEMENTS.items(), start=1)
    ]
    return Settings(
        storage_elements=json.dumps(elements),  # type: ignore[arg-type]
        spool_dir=tmp_path,
        retry_max_attempts=3,
        # Virtual time may jump while a worker thread hashes on a loaded machine: no
        # watchdog may take such a jump for a stalled element or an idle client.
        se_stall_timeout_s=3600,
        client_idle_timeout_s=3600,
    )


@pytest.fixture
async def world(settings: Settings, tmp_path: Path) -> AsyncIterator[World]:
    elements = Elements()
    metrics = Metrics()
    async with httpx.AsyncClient(transport=elements) as http:
        pool = ElementPool(
            Registry(configured_elements(settings.storage_elements)),
            BreakerBoard(BreakerPolicy(failure_threshold=5)),
            StorageElementClient(
                http,
                stall_timeout_s=settings.se_stall_timeout_s,
                response_timeout_s=30,
                connect_timeout_s=5,
                probe_timeout_s=5,
            ),
            build_se_token_provider(settings, http),
            metrics,
            retry_policy=RetryPolicy(base_s=0.5, cap_s=4, max_attempts=3),
            retry_budget_ratio=1.0,
            compensation_timeout_s=10,
        )
        store = MemorySagaStore()
        sagas = SagaBook(
            store,
            pool.remove,
            metrics,
            lease_s=30,
            janitor_interval_s=10,
            backoff=RetryPolicy(base_s=1, cap_s=5, max_attempts=1),
            compensation_timeout_s=10,
            recheck_s=RECHECK_S,
            wall_clock=trio.current_time,
        )
        memory = MemoryBudget(settings.memory_budget_bytes)
        files = SpoolFiles(tmp_path, keep_bytes=0)

        def spool_for(upload_id: str) -> Spool:
            return Spool(
                tmp_path,
                upload_id,
                disk=SpoolBudget(settings.spool_max_bytes),
                memory=memory,
                memory_limit=settings.spool_memory_bytes,
                files=files,
            )

        pipeline = UploadPipeline(
            settings, pool=pool, sagas=sagas, metrics=metrics, spool_for=spool_for
        )
        async with trio.open_nursery() as nursery:
            elements.background = nursery
            await nursery.start(sagas.run)
            yield World(pipeline, elements, sagas, store, settings, metrics, memory)
            nursery.cancel_scope.cancel()
        files.close()


def random_bytes(size: int) -> bytes:
    return hashlib.shake_256(str(size).encode()).digest(size)


def stored(world: World) -> Iterator[tuple[str, str, bytes]]:
    for name, element in world.elements.elements.items():
        for file_id, data in element.files.items():
            yield name, file_id, data


@pytest.mark.parametrize("size", [0, 1, 300 * 1024, 3 * MIB])
async def test_a_file_only_form_lands_whole_on_the_preferred_element(
    world: World, clock: trio.testing.MockClock, size: int
) -> None:
    # An empty file goes nowhere without an element that takes empty files: not the point.
    data = random_bytes(size) if size else b"x"
    with trio.fail_after(600):
        result = await world.upload(form({}, data, {}))
    assert result["storage_element_id"] == "se-a"
    assert result["checksum"] == hashlib.sha256(data).hexdigest()
    assert list(stored(world)) == [("se-a", result["file_id"], data)]
    assert world.store._records == {}


async def test_a_late_field_that_changes_the_plan_stores_from_the_spool(
    world: World, clock: trio.testing.MockClock
) -> None:
    data = random_bytes(2 * MIB + 17)
    with trio.fail_after(600):
        result = await world.upload(form({}, data, {"retention_policy": "permanent"}))
    # Permanent files live on rw elements: the first pass (to an edit element) was
    # abandoned before its end, and the spool went to the rw one.
    assert result["storage_element_id"] == "se-r"
    assert result["retention_policy"] == "permanent"
    assert list(stored(world)) == [("se-r", result["file_id"], data)]


async def test_an_element_reset_mid_stream_fails_over_and_leaves_one_copy(
    world: World, clock: trio.testing.MockClock
) -> None:
    data = random_bytes(3 * MIB)
    world.elements["se-a"].reset_after = MIB
    with trio.fail_after(600):
        result = await world.upload(form({"compress": "false"}, data, {}))
        # The failed element's leftovers are removed by the saga (in its nursery).
        await trio.testing.wait_all_tasks_blocked()
    assert result["storage_element_id"] == "se-b"
    assert list(stored(world)) == [("se-b", result["file_id"], data)]
    assert world.elements["se-a"].removed == [result["file_id"]]
    assert world.metrics.failovers.labels("se-a")._value.get() == 1


async def test_every_element_down_is_a_503_after_the_retry_rounds_and_leaves_nothing(
    world: World, clock: trio.testing.MockClock
) -> None:
    world.elements["se-a"].down = True
    world.elements["se-b"].down = True
    with trio.fail_after(300):
        start = trio.current_time()
        with pytest.raises(BaseExceptionGroup) as caught:
            await world.upload(form({}, random_bytes(MIB), {}))
        error = collapse(caught.value)
        waited = trio.current_time() - start
        assert isinstance(error, NoStorageAvailable)
        assert error.status == 503
        # Three rounds, full-jitter backoffs between them (virtual seconds).
        assert 0 < waited <= 0.5 + 1.0
        # The saga asked both elements to drop what they might hold; they are down, so the
        # removals wait in the record and are retried until the elements answer.
        assert len(world.store._records) == 1
        world.elements["se-a"].down = False
        world.elements["se-b"].down = False
        # A virtual minute: the compensator's backoff (at most 5 s) comes round several times.
        await trio.sleep(60)
        assert world.store._records == {}
    assert list(stored(world)) == []
    assert {name for name in ELEMENTS if world.elements[name].removed} == {"se-a", "se-b"}


async def test_a_source_that_hashes_what_it_reads_is_trusted_and_checked(
    world: World, clock: trio.testing.MockClock
) -> None:
    """A file read from disk (a finished resumable upload) comes with its reader's sha256:
    the pipeline records it without hashing again, through a failover too."""
    data = random_bytes(3 * MIB + 5)
    world.elements["se-a"].reset_after = MIB
    with trio.fail_after(600):
        result = await world.upload_read(data, hashlib.sha256())
        await trio.testing.wait_all_tasks_blocked()
    assert result["checksum"] == hashlib.sha256(data).hexdigest()
    assert list(stored(world)) == [("se-b", result["file_id"], data)]
    assert world.elements["se-a"].removed == [result["file_id"]]
    # Its size known and nothing compressed: each attempt declared its body's length, and
    # the one that went through sent exactly that.
    ((framing, received),) = world.elements["se-b"].framing
    assert framing == str(received)
    assert world.elements["se-a"].framing[0][0] != "chunked"


async def test_a_compressed_file_of_known_size_goes_chunked(
    world: World, clock: trio.testing.MockClock
) -> None:
    data = text_bytes(2 * MIB)
    fields = {"compress": "true", "compression_algorithm": "gzip"}
    with trio.fail_after(600):
        result = await world.upload_read(data, hashlib.sha256(), fields)
    assert result["compressed"] is True
    assert [framing for framing, _ in world.elements["se-a"].framing] == ["chunked"]
    ((_, _, kept),) = list(stored(world))
    assert gzip.decompress(kept) == data


async def test_a_wrong_hash_from_the_source_is_caught_and_nothing_is_kept(
    world: World, clock: trio.testing.MockClock
) -> None:
    """The element reports the sha256 of what it stored: a source whose hash is not that of
    its bytes looks like a lying element at first (the upload fails over), until a second
    element reports the same bytes; then the upload fails (502 CHECKSUM_MISMATCH) and both
    copies are removed."""
    data = random_bytes(2 * MIB)
    wrong = hashlib.sha256(b"not part of the file")
    with trio.fail_after(600):
        with pytest.raises(BaseExceptionGroup) as caught:
            await world.upload_read(data, wrong)
        await trio.testing.wait_all_tasks_blocked()
    error = collapse(caught.value)
    assert isinstance(error, IntegrityError)
    assert error.code == "CHECKSUM_MISMATCH"
    assert list(stored(world)) == []


def text_bytes(size: int) -> bytes:
    """Compressible bytes: lines of words from a small vocabulary."""
    words = [hashlib.sha256(str(n).encode()).hexdigest()[:8] for n in range(500)]
    out = bytearray()
    n = 0
    while len(out) < size:
        digest = hashlib.sha256(str(n).encode()).hexdigest()
        line = " ".join(words[int(digest[k : k + 3], 16) % 500] for k in range(0, 36, 3))
        out += f"{n} {digest[:20]} {line}\n".encode()
        n += 1
    return bytes(out[:size])


@pytest.mark.parametrize("algorithm", ["brotli", "gzip"])
async def test_a_compressed_upload_fails_over_mid_stream_and_is_stored_whole(
    world: World, clock: trio.testing.MockClock, algorithm: str
) -> None:
    """What the failed attempt had taken goes again, re-encoded from the spool by the next
    attempt's own compressor: the stored copy is the whole file, and the memory budget is
    whole after."""
    data = text_bytes(6 * MIB + 11)
    # The element resets once part of the compressed stream has arrived.
    world.elements["se-a"].reset_after = 64 * 1024
    fields = {"compress": "true", "compression_algorithm": algorithm}
    with trio.fail_after(600):
        result = await world.upload(form(fields, data, {}))
        await trio.testing.wait_all_tasks_blocked()
    assert result["storage_element_id"] == "se-b"
    assert result["compressed"] is True
    assert result["checksum"] == hashlib.sha256(data).hexdigest()
    ((name, file_id, kept),) = list(stored(world))
    assert (name, file_id) == ("se-b", result["file_id"])
    restored = brotli.decompress(kept) if algorithm == "brotli" else gzip.decompress(kept)
    assert restored == data
    assert world.elements["se-a"].removed == [result["file_id"]]
    assert world.memory.used == 0


async def test_a_half_open_trial_refused_for_the_request_goes_back_to_the_breaker(
    world: World, clock: trio.testing.MockClock
) -> None:
    """An upload takes the trial of a half-open element, which answers 401 (the request's
    fault, not the element's): the trial must go back, or nothing would ever send that
    element an upload or a probe again."""
    board = world.pipeline.pool.breakers
    known = list(ELEMENTS)
    for _ in range(5):
        board.record_failure("se-a", trio.current_time(), known=known)
    await trio.sleep(BreakerPolicy().open_base_s + 1)
    assert board.breaker("se-a").trial_available(trio.current_time())
    world.elements["se-a"].refuse = 401
    with trio.fail_after(600):
        with pytest.raises(BaseExceptionGroup) as caught:
            await world.upload(form({"compress": "false"}, random_bytes(MIB), {}))
        refused = collapse(caught.value)
        assert isinstance(refused, StorageElementRejected)
        assert refused.code == "STORAGE_ELEMENT_REJECTED"
        assert len(world.elements["se-a"].framing) == 1
        # The trial is free again: the prober (or the next upload) may take it.
        assert board.breaker("se-a").trial_available(trio.current_time())
        world.elements["se-a"].refuse = None
        data = random_bytes(MIB + 1)
        result = await world.upload(form({"compress": "false"}, data, {}))
    assert result["storage_element_id"] == "se-a"
    assert list(stored(world)) == [("se-a", result["file_id"], data)]
    assert board.breaker("se-a").state(trio.current_time()) is BreakerState.CLOSED


async def test_a_replay_never_puts_its_file_where_a_late_removal_of_the_same_id_may_land(
    world: World, clock: trio.testing.MockClock
) -> None:
    """Found by a review. The first pass fails over from se-a (reset mid-stream), whose copy
    cannot be confirmed removed yet (its removal is slow); a late field then changes the
    plan, and the replay keeps the file id. Sent to se-a again, the stored file would be
    deleted when that removal lands. The replay goes elsewhere; the file survives it."""
    data = random_bytes(3 * MIB)
    slow = world.elements["se-a"]
    slow.reset_after = MIB
    slow.delete_gate = trio.Event()
    with trio.fail_after(600):
        result = await world.upload(form({}, data, {"compress": "true"}))
        assert result["storage_element_id"] == "se-b"
        slow.delete_gate.set()  # the removals land now
        await trio.sleep(60)  # the compensator's rounds, virtual time
    assert list(stored(world)) == [("se-b", result["file_id"], data)]


async def test_a_copy_stored_after_its_upload_was_abandoned_past_the_last_byte_is_removed(
    world: World, clock: trio.testing.MockClock
) -> None:
    """artStore's element writes the file after the last byte and finishes whoever hung up.
    The client goes between the two: the removal at once finds nothing, which proves
    nothing; the saga checks again and removes the file once it is there."""
    data = random_bytes(MIB + 5)
    slow = world.elements["se-a"]
    slow.write_gate = trio.Event()
    with trio.fail_after(600):
        with trio.CancelScope() as client:

            async def client_goes() -> None:
                await slow.body_in.wait()
                client.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_goes)
                await world.upload(form({"compress": "false"}, data, {}))
        assert client.cancelled_caught
        file_id = slow.removed[0]  # removed at once: not there yet
        assert slow.files == {}
        # Kept in the record: the element may still store it.
        assert len(world.store._records) == 1
        slow.write_gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert list(slow.files) == [file_id]  # the late write landed
        await trio.sleep(RECHECK_S + 10)  # the compensator's rounds, virtual time
    assert list(stored(world)) == []
    assert slow.removed.count(file_id) >= 2
    assert world.store._records == {}


async def test_a_breaker_that_opens_as_the_201_comes_keeps_the_stored_file(
    world: World, clock: trio.testing.MockClock
) -> None:
    """Other uploads' failures open se-a's breaker just as se-a answers this one's 201: the
    file is stored there, whole. It used to be taken for a failure: removed, and sent again
    in full to the next element."""
    data = random_bytes(MIB + 9)
    pool = world.pipeline.pool
    failing = StorageElementUnavailable("another upload's failure", element_id="se-a")

    opened: list[BreakerState] = []

    def others_fail() -> None:
        for _ in range(5):  # the breaker's threshold in this world
            pool.note_failure("se-a", failing)
        opened.append(pool.breakers.breaker("se-a").state(trio.current_time()))

    world.elements["se-a"].on_stored = others_fail
    with trio.fail_after(600):
        result = await world.upload(form({"compress": "false"}, data, {}))
        await trio.testing.wait_all_tasks_blocked()
    assert opened == [BreakerState.OPEN]
    assert result["storage_element_id"] == "se-a"
    assert list(stored(world)) == [("se-a", result["file_id"], data)]
    assert world.elements["se-a"].removed == []
    assert [n for n, _ in world.elements["se-b"].framing] == []
