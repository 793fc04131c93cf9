"""Finalization moves built from their parts, with no server and no process: the finalizer on
the in-process store, a real `ElementPool` and element client, and Storage Elements (an `edit`
source, three `rw` targets), a token endpoint and an Admin Module answering through an httpx
transport in this process. Time is trio's `MockClock` (see `clock`): delays, backoffs and
token lifetimes cost nothing.

What a user would check: the status and error code of a request, the transaction's state, the
file present or absent on each element (with its sha256), the Admin Module's record.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ingester.auth.principal import Principal
from ingester.errors import IngesterError, StorageElementUnavailable
from ingester.finalize.finalizer import Finalizer
from ingester.finalize.record import SourceFile, Transaction, TxState
from ingester.finalize.store import MemoryFinalizeStore
from ingester.metrics import Metrics
from ingester.ownership import MemoryOwnershipStore, Ownership
from ingester.resilience.breaker import BreakerBoard, BreakerPolicy, BreakerState
from ingester.resilience.retry import RetryPolicy
from ingester.saga.record import Copy
from ingester.settings import SEMode, Settings
from ingester.storage.admin import AdminRegistry
from ingester.storage.client import StorageElementClient
from ingester.storage.pool import ElementPool
from ingester.storage.registry import Registry, configured_elements
from ingester.storage.se_auth import build_se_token_provider
from tests.support.multipart import parse_form

FILE_ID = "3f1c6c1e-0d3b-4b47-9a55-1f0b8b6c0a11"
DATA = bytes(range(256)) * 64
SHA256 = hashlib.sha256(DATA).hexdigest()
# id, mode, priority (lower first): rw-a is the preferred target, then rw-b, then rw-c.
ELEMENTS = [("se-edit", "edit", 1), ("rw-a", "rw", 1), ("rw-b", "rw", 2), ("rw-c", "rw", 3)]
COMPENSATION_TIMEOUT_S = 5.0
ADMIN_TIMEOUT_S = 5.0
RETENTION_S = 3600.0
ALICE = Principal("alice", "alice", frozenset({"user"}), frozenset(), "access", None, "alice-t")
BOB = Principal("bob", "bob", frozenset({"user"}), frozenset(), "access", None, "bob-t")
ROOT = Principal("root", "root", frozenset({"admin"}), frozenset(), "access", None, "root-t")


@dataclass
class Element:
    """One fake element: the files it keeps (with their metadata), and how it fails."""

    mode: str
    files: dict[str, bytes] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Refuse connections, as a dead element does (not one byte reaches it).
    down: bool = False
    # Answer the next uploads with these statuses (after reading the body), one each.
    upload_answers: list[int] = field(default_factory=list)
    # Store the next uploads, then reset the connection instead of answering, one each.
    lost_answers: int = 0
    # Store the next uploads with their last byte changed (and report that), one each.
    corrupts: int = 0
    uploads: int = 0
    # Removals (`DELETE /api/v1/gc/{id}`) to carry out late: the element answers only
    # after the caller gave up, and removes the file `late_removal_s` after the request.
    late_removals: int = 0
    # Removals find the element down until this (trio) time.
    removals_down_until: float = 0.0


@dataclass
class AdminModule:
    """The Admin Module's file registry: records by file id. A commit (`PUT`) is answered
    with the next of `commit_answers` (200 once they run out), and applied when that is a
    success, `SLOW` or `LOST`."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    commit_answers: list[int] = field(default_factory=list)
    commits: int = 0


SLOW = 0  # a commit applied, answered long after the ingester stopped waiting
LOST = 1  # a commit applied, its connection reset before the answer


class World(httpx.AsyncBaseTransport):
    """Elements at `http://<id>`, a token endpoint at `http://idp` and an Admin Module at
    `http://admin`, in this process."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.elements = {name: Element(mode) for name, mode, _ in ELEMENTS}
        self.admin = AdminModule()
        # Where work that outlives its request runs (late removals).
        self.nursery = nursery
        self.late_removal_s = 3 * COMPENSATION_TIMEOUT_S
        # Tokens the token endpoint issued, with their expiry (trio time); element calls
        # whose token is not one of them, or has expired, are answered 401 when `checked`.
        self.tokens: dict[str, float] = {}
        self.token_lifetime_s = 30.0
        self.checked = False
        self.expired_seen = 0

    def __getitem__(self, name: str) -> Element:
        return self.elements[name]

    def holding(self) -> dict[str, str]:
        """Element → sha256 of what it keeps of the file, for each element that keeps it."""
        return {
            name: hashlib.sha256(element.files[FILE_ID]).hexdigest()
            for name, element in self.elements.items()
            if FILE_ID in element.files
        }

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == "idp":
            token = f"service-{len(self.tokens)}"
            self.tokens[token] = trio.current_time() + self.token_lifetime_s
            return httpx.Response(
                200,
                json={
                    "access_token": token,
                    "token_type": "Bearer",
                    "expires_in": self.token_lifetime_s,
                },
            )
        if host == "admin":
            return await self._admin(request)
        element = self.elements[host]
        if element.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.checked:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if self.tokens.get(token, 0.0) <= trio.current_time():
                self.expired_seen += 1
                return httpx.Response(401, json={"detail": "token expired"})
        path = request.url.path
        file_id = path.split("/")[4] if path.count("/") >= 4 else ""
        if request.method == "POST":
            return await self._upload(element, request)
        if request.method == "GET" and path.endswith("/download"):
            if file_id not in element.files:
                return httpx.Response(404, json={"detail": "not found"})
            return httpx.Response(200, stream=Pieces(element.files[file_id]))
        if request.method == "GET":
            if file_id not in element.meta:
                return httpx.Response(404, json={"detail": "not found"})
            return httpx.Response(200, json=element.meta[file_id])
        if request.method == "DELETE" and path.startswith("/api/v1/gc/"):
            if trio.current_time() < element.removals_down_until:
                raise httpx.ConnectError("connection refused", request=request)
            if element.late_removals:
                element.late_removals -= 1
                self.nursery.start_soon(self._remove_late, element, file_id)
                await trio.sleep_forever()
            return self._remove(element, file_id)
        if request.method == "DELETE":
            return self._remove(element, file_id)
        raise AssertionError(f"unexpected {request.method} {request.url}")

    async def _upload(self, element: Element, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/files/upload"
        element.uploads += 1
        received = bytearray()
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for chunk in request.stream:
            received += chunk
        if element.upload_answers:
            status = element.upload_answers.pop(0)
            return httpx.Response(status, json={"detail": f"answered {status}"})
        fields, data = parse_form(bytes(received), request.headers["Content-Type"])
        file_id = fields["file_id"]
        if element.lost_answers:
            element.lost_answers -= 1
            element.files[file_id] = data
            raise httpx.ReadError("connection reset by peer", request=request)
        if element.corrupts:
            element.corrupts -= 1
            data = data[:-1] + bytes([data[-1] ^ 1])
        element.files[file_id] = data
        element.meta[file_id] = {
            "file_id": file_id,
            "original_filename": "report.bin",
            "checksum": hashlib.sha256(data).hexdigest(),
            "file_size": len(data),
            "retention_policy": fields["retention_policy"],
            "created_by_id": "ingester-service",
        }
        return httpx.Response(
            201,
            json={
                "file_id": file_id,
                "file_size": len(data),
                "checksum": hashlib.sha256(data).hexdigest(),
            },
        )

    def _remove(self, element: Element, file_id: str) -> httpx.Response:
        element.meta.pop(file_id, None)
        if element.files.pop(file_id, None) is None:
            return httpx.Response(404, json={"detail": "not found"})
        return httpx.Response(200, json={"file_id": file_id, "status": "deleted"})

    async def _remove_late(self, element: Element, file_id: str) -> None:
        await trio.sleep(self.late_removal_s)
        self._remove(element, file_id)

    async def _admin(self, request: httpx.Request) -> httpx.Response:
        admin = self.admin
        file_id = request.url.path.rsplit("/", 1)[1]
        if request.method == "GET":
            if file_id not in admin.files:
                return httpx.Response(404, json={"detail": "not found"})
            return httpx.Response(200, json=admin.files[file_id])
        assert request.method == "PUT"
        admin.commits += 1
        status = admin.commit_answers.pop(0) if admin.commit_answers else 200
        if 200 <= status < 300 or status in (SLOW, LOST):
            admin.files[file_id] = admin.files.get(file_id, {}) | json.loads(request.content)
        if status == LOST:
            raise httpx.ReadError("connection reset by peer", request=request)
        if status == SLOW:
            await trio.sleep(10 * ADMIN_TIMEOUT_S)
            status = 200
        return httpx.Response(status, json=admin.files.get(file_id, {"detail": "refused"}))


class Pieces(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._data), 4096):
            yield self._data[start : start + 4096]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with trio.open_nursery() as nursery:
        yield World(nursery)
        nursery.cancel_scope.cancel()


class ObservedFinalizer(Finalizer):
    """The finalizer, telling when each move it ran ended (done, rolled back or stopped)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ended: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self.ended_as: dict[str, Transaction] = {}

    async def _drive(self, tx: Transaction, recovered: bool) -> None:
        try:
            await super()._drive(tx, recovered)
        finally:
            self.ended_as[tx.transaction_id] = tx
            self.ended[tx.transaction_id].set()


@dataclass
class Mover:
    finalizer: ObservedFinalizer
    store: MemoryFinalizeStore
    pool: ElementPool
    board: BreakerBoard

    async def move(self, who: Principal = ALICE) -> Transaction:
        """Finalize the world's temporary file (on se-edit) as a request does, and wait for
        the move to end: done or rolled back."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.finalizer.run)
            tx = await self.finalizer.begin(FILE_ID, who)
            await self.finalizer.ended[tx.transaction_id].wait()
            nursery.cancel_scope.cancel()
        return tx

    async def take_over(self, tx: Transaction) -> Transaction:
        """Continue `tx`, a dead ingester's, as a janitor that claimed it does; wait for its
        end."""
        assert await self.store.create(tx, due=0.0, retention_s=RETENTION_S) is None
        async with trio.open_nursery() as nursery:
            await nursery.start(self.finalizer.run)
            self.finalizer._take_over(tx.to_json())
            await self.finalizer.ended[tx.transaction_id].wait()
            nursery.cancel_scope.cancel()
        return self.finalizer.ended_as[tx.transaction_id]


@pytest.fixture
async def mover_of(world: World) -> AsyncIterator[Callable[..., Mover]]:
    """Builds the finalizer (settings overridden by keywords) on the world; a temporary file
    of alice's is on se-edit."""
    world["se-edit"].files[FILE_ID] = DATA
    world["se-edit"].meta[FILE_ID] = {
        "file_id": FILE_ID,
        "original_filename": "report.bin",
        "content_type": "application/octet-stream",
        "checksum": SHA256,
        "file_size": len(DATA),
        "retention_policy": "temporary",
        "created_by_id": "alice",
    }
    clients: list[httpx.AsyncClient] = []

    def build(*, admin: bool = False, **overrides: Any) -> Mover:
        elements = [
            {"id": name, "api_url": f"http://{name}", "mode": mode, "priority": priority}
            for name, mode, priority in ELEMENTS
        ]
        settings = Settings(
            storage_elements=json.dumps(elements),  # type: ignore[arg-type]
            **{
                "finalize_source_delete_delay_s": 60.0,
                "compensation_backoff_max_s": 10.0,
                "compensation_timeout_s": COMPENSATION_TIMEOUT_S,
                "finalize_max_attempts": 3,
                "retry_base_s": 0.5,
                "retry_cap_s": 2.0,
                **overrides,
            },
        )
        http = httpx.AsyncClient(transport=world)
        clients.append(http)
        board = BreakerBoard(
            BreakerPolicy(
                failure_threshold=1, open_base_s=5.0, open_max_s=20.0, max_ejected_share=0.5
            )
        )
        pool = ElementPool(
            Registry(configured_elements(settings.storage_elements)),
            board,
            StorageElementClient(
                http,
                stall_timeout_s=30,
                response_timeout_s=30,
                connect_timeout_s=5,
                probe_timeout_s=5,
            ),
            build_se_token_provider(settings, http),
            Metrics(),
            retry_policy=RetryPolicy(),
            retry_budget_ratio=0.2,
            compensation_timeout_s=COMPENSATION_TIMEOUT_S,
        )
        store = MemoryFinalizeStore()
        finalizer = ObservedFinalizer(
            settings,
            store=store,
            pool=pool,
            ownership=Ownership(MemoryOwnershipStore(100), grace_s=60),
            metrics=CollectorRegistry(),
            draining=lambda: False,
            admin=AdminRegistry(
                http,
                "http://admin",
                timeout_s=ADMIN_TIMEOUT_S,
                policy=RetryPolicy(base_s=0.1, cap_s=1.0, max_attempts=3),
            )
            if admin
            else None,
        )
        return Mover(finalizer, store, pool, board)

    yield build
    for http in clients:
        await http.aclose()


# --- who may learn what -------------------------------------------------------------------


@pytest.mark.parametrize("told_by", ["rw element", "admin module"])
async def test_another_users_permanent_file_is_as_unknown_as_a_missing_one(
    world: World, mover_of: Callable[..., Mover], told_by: str
) -> None:
    """A finalized file of alice's: bob is answered 404 FILE_NOT_FOUND, as for an id that
    names nothing; 409 ALREADY_PERMANENT (the file exists) is for alice and admins."""
    source = world["se-edit"]
    world["rw-a"].files[FILE_ID] = source.files.pop(FILE_ID)
    world["rw-a"].meta[FILE_ID] = source.meta.pop(FILE_ID) | {"retention_policy": "permanent"}
    if told_by == "admin module":
        world.admin.files[FILE_ID] = {
            "file_id": FILE_ID,
            "retention_policy": "permanent",
            "storage_element_id": "rw-a",
            "uploaded_by": "alice",
        }
    finalizer = mover_of(admin=told_by == "admin module").finalizer
    with trio.fail_after(60):
        answers: dict[tuple[str, str], tuple[int, str]] = {}
        for who in (BOB, ALICE, ROOT):
            for file_id in (FILE_ID, "3f1c6c1e-0d3b-4b47-9a55-000000000000"):
                with pytest.raises(IngesterError) as refused:
                    await finalizer.begin(file_id, who)
                answers[who.subject, file_id[-4:]] = (refused.value.status, refused.value.code)
    missing = (404, "FILE_NOT_FOUND")
    permanent = (409, "ALREADY_PERMANENT")
    assert answers == {
        ("bob", "0a11"): missing,
        ("bob", "0000"): missing,
        ("alice", "0a11"): permanent,
        ("alice", "0000"): missing,
        ("root", "0a11"): permanent,
        ("root", "0000"): missing,
    }
    assert world.holding() == {"rw-a": SHA256}


# --- credentials --------------------------------------------------------------------------

# Tokens of the service's own, from the world's token endpoint (they live 30 s there).
SERVICE_ACCOUNT = {
    "se_auth": "client_credentials",
    "se_token_url": "http://idp/token",
    "se_client_id": "ingester",
    "se_client_secret": "secret",
}


async def test_a_service_token_is_fetched_for_each_request_of_a_long_move(
    world: World, mover_of: Callable[..., Mover], clock: trio.testing.MockClock
) -> None:
    """With INGESTER_SE_AUTH=client_credentials the move used the token it got at the
    request to its end: the source delete, 60 s after the commit, carried a token 30 s dead,
    was refused and retried with it forever. Each request now asks the pool, which
    refreshes the token in time."""
    world.checked = True
    mover = mover_of(**SERVICE_ACCOUNT)
    with trio.fail_after(600):
        tx = await mover.move()
    assert (tx.state, tx.error_code) == (TxState.DONE, None)
    assert tx.source_deleted
    assert world.holding() == {"rw-a": SHA256}
    assert world.expired_seen == 0
    assert len(world.tokens) > 1


async def test_a_rollback_longer_than_a_token_lives_asks_for_a_new_one(
    world: World, mover_of: Callable[..., Mover], clock: trio.testing.MockClock
) -> None:
    """The rollback read the credential once, before its retry-forever loop: an element
    that came back after the token expired was then refused every removal, and the file's
    lock was never released. Each round now asks for the credential."""
    world.checked = True
    world["se-edit"].files[FILE_ID] = bytes(reversed(DATA))  # not what the source reports
    world["rw-a"].removals_down_until = trio.current_time() + 120
    mover = mover_of(**SERVICE_ACCOUNT)
    with trio.fail_after(600):
        tx = await mover.move()
    assert (tx.state, tx.error_code) == (TxState.ROLLED_BACK, "SOURCE_CHECKSUM_MISMATCH")
    # The target copy is gone, the source untouched, and the file may be finalized again.
    assert world.holding() == {"se-edit": hashlib.sha256(bytes(reversed(DATA))).hexdigest()}
    again = Transaction(
        transaction_id="22222222-2222-3333-4444-555555555555",
        file_id=FILE_ID,
        owner="another",
        requested_by="alice",
        source=tx.source,
        file=tx.file,
    )
    assert await mover.store.create(again, due=0.0, retention_s=RETENTION_S) is None
    assert world.expired_seen == 0


# --- failover -----------------------------------------------------------------------------


async def test_an_element_whose_copy_is_not_confirmed_gone_gets_no_new_copy(
    world: World, mover_of: Callable[..., Mover], clock: trio.testing.MockClock
) -> None:
    """rw-a fails the copy (500) and the removal of its partial copy times out on our side:
    rw-a carries it out later. Every element failing the first round, the next round used
    to start from rw-a again, which took the copy; the late removal then deleted the
    committed copy, and the source went after the delay: the file on no element. Now rw-a
    gets no second copy; the move commits on rw-c."""
    world["rw-a"].upload_answers = [500]
    world["rw-a"].late_removals = 1
    world["rw-b"].upload_answers = [500] * 10
    world["rw-c"].upload_answers = [500]
    mover = mover_of()
    with trio.fail_after(600):
        tx = await mover.move()
    # The file is kept, on the element the transaction names.
    assert world.holding() == {"rw-c": SHA256}
    assert (tx.state, tx.target) == (TxState.DONE, Copy("rw-c", "http://rw-c"))
    assert tx.source_deleted
    assert world["rw-a"].uploads == 1


@pytest.mark.parametrize("ending", ["done", "rolled back"])
async def test_an_element_never_reached_holds_up_neither_the_end_nor_a_rollback(
    world: World, mover_of: Callable[..., Mover], clock: trio.testing.MockClock, ending: str
) -> None:
    """rw-a is down: not one byte reaches it. Its copy stayed in the transaction, so the
    move was done only once rw-a answered a removal (never, if it was decommissioned), and
    a rollback held the file's lock as long. An attempt that sent nothing now leaves no
    copy behind."""
    world["rw-a"].down = True
    if ending == "rolled back":
        world["rw-b"].down = world["rw-c"].down = True
    mover = mover_of()
    with trio.fail_after(600):
        tx = await mover.move()
    if ending == "done":
        assert (tx.state, tx.target) == (TxState.DONE, Copy("rw-b", "http://rw-b"))
        assert world.holding() == {"rw-b": SHA256}
    else:
        assert (tx.state, tx.error_code) == (TxState.ROLLED_BACK, "NO_STORAGE_AVAILABLE")
        assert world.holding() == {"se-edit": SHA256}
        # The lock went with the rollback: the file may be finalized again.
        world["rw-c"].down = False
        with trio.fail_after(600):
            again = await mover.move()
        assert (again.state, again.target) == (TxState.DONE, Copy("rw-c", "http://rw-c"))
        assert world.holding() == {"rw-c": SHA256}


async def test_a_copy_sent_whole_and_never_answered_is_still_removed(
    world: World, mover_of: Callable[..., Mover], clock: trio.testing.MockClock
) -> None:
    """rw-a gets the whole form, stores it and resets the connection instead of answering:
    unlike an element never reached, it may hold the copy (artStore's writes it after the
    last byte), so the copy stays in the transaction and goes before the move is done."""
    world["rw-a"].lost_answers = 1
    mover = mover_of(saga_recheck_s=30.0)
    with trio.fail_after(600):
        tx = await mover.move()
    assert (tx.state, tx.target) == (TxState.DONE, Copy("rw-b", "http://rw-b"))
    assert world.holding() == {"rw-b": SHA256}
    assert world["rw-a"].uploads == 1


# --- breakers -----------------------------------------------------------------------------


@pytest.mark.parametrize("ended_by", ["the source", "a refusal of the request"])
async def test_a_half_open_trial_the_copy_took_goes_back(
    world: World, mover_of: Callable[..., Mover], clock: trio.testing.MockClock, ended_by: str
) -> None:
    """The copy takes the single trial of rw-a, half-open after a failure. The attempt ends
    with no verdict on rw-a: the source is gone (404), or rw-a refuses the request (413, the
    request's fault). The trial used to stay taken: no upload, move or probe ever went to
    rw-a again until a restart. Now it goes back."""
    mover = mover_of()
    mover.pool.note_failure("rw-a", StorageElementUnavailable("reset", element_id="rw-a"))
    await trio.sleep(10)  # past the open time: half-open
    assert mover.board.breaker("rw-a").trial_available(trio.current_time())
    if ended_by == "the source":
        world["se-edit"].files.clear()  # its metadata still says it is there
    else:
        world["rw-a"].upload_answers = [413]
    with trio.fail_after(600):
        tx = await mover.move()
    if ended_by == "the source":
        assert (tx.state, tx.error_code) == (TxState.ROLLED_BACK, "SOURCE_UNAVAILABLE")
        assert world.holding() == {}
    else:
        assert (tx.state, tx.target) == (TxState.DONE, Copy("rw-b", "http://rw-b"))
        assert world.holding() == {"rw-b": SHA256}
        assert world["rw-a"].uploads == 1
    # rw-a is the first choice again, of the next move as of an upload.
    assert mover.board.breaker("rw-a").trial_available(trio.current_time())
    preferred = mover.pool.next_element(SEMode.RW, len(DATA), [])
    assert preferred is not None
    assert preferred.id == "rw-a"


async def test_a_target_that_keeps_other_bytes_counts_against_its_breaker(
    world: World, mover_of: Callable[..., Mover], clock: trio.testing.MockClock
) -> None:
    """rw-a stores the copy with a byte changed and says so in its sha256: its copy is
    removed and the move goes on to rw-b, as before. It used to count as a success for
    rw-a's breaker; an element that keeps other bytes than it is sent is failing, and now
    counts so (this world's breakers open at one failure)."""
    world["rw-a"].corrupts = 1
    mover = mover_of()
    with trio.fail_after(600):
        tx = await mover.move()
    assert (tx.state, tx.target) == (TxState.DONE, Copy("rw-b", "http://rw-b"))
    assert world.holding() == {"rw-b": SHA256}
    assert world["rw-a"].uploads == 1
    # Opened by the failure (half-open by now: the move outlived its open time); a success
    # would have kept it closed.
    assert mover.board.breaker("rw-a").state(trio.current_time()) is not BreakerState.CLOSED


# --- the commit ---------------------------------------------------------------------------


def registered(world: World) -> None:
    """The Admin Module knows the temporary file, as the upload registered it."""
    world.admin.files[FILE_ID] = {
        "file_id": FILE_ID,
        "retention_policy": "temporary",
        "storage_element_id": "se-edit",
        "uploaded_by": "alice",
    }


def admin_points_at(world: World) -> tuple[str, str]:
    record = world.admin.files[FILE_ID]
    return record["retention_policy"], record["storage_element_id"]


@pytest.mark.parametrize(
    "answers",
    [[SLOW], [503] * 9, [LOST, 409]],
    ids=["applied, answered late", "5xx for a while", "applied, then refused as done"],
)
async def test_a_commit_the_admin_module_may_have_applied_is_never_rolled_back(
    world: World,
    mover_of: Callable[..., Mover],
    clock: trio.testing.MockClock,
    answers: list[int],
) -> None:
    """Every failed commit used to roll back, removing the target. But the Admin Module may
    have applied the PUT it did not answer in time (or answered 5xx): it then pointed at a
    removed copy, and the file was lost once its temporary copy expired. Now only a refusal
    its record does not contradict rolls back; otherwise the move stays `committing`, reads
    the record and sends the commit again until it is known."""
    registered(world)
    world.admin.commit_answers = list(answers)
    mover = mover_of(admin=True)
    with trio.fail_after(600):
        tx = await mover.move()
    assert admin_points_at(world) == ("permanent", "rw-a")
    assert world.holding() == {"rw-a": SHA256}
    assert (tx.state, tx.error_code) == (TxState.DONE, None)
    assert [state for state, _ in tx.history] == [
        "pending",
        "copying",
        "committing",
        "committed",
        "done",
    ]


async def test_a_refused_commit_rolls_back(
    world: World, mover_of: Callable[..., Mover], clock: trio.testing.MockClock
) -> None:
    registered(world)
    world.admin.commit_answers = [422]
    mover = mover_of(admin=True)
    with trio.fail_after(600):
        tx = await mover.move()
    assert (tx.state, tx.error_code) == (TxState.ROLLED_BACK, "ADMIN_COMMIT_FAILED")
    assert admin_points_at(world) == ("temporary", "se-edit")
    assert world.holding() == {"se-edit": SHA256}
    assert world.admin.commits == 1


async def test_a_commit_taken_over_is_sent_until_its_outcome_is_known(
    world: World, mover_of: Callable[..., Mover], clock: trio.testing.MockClock
) -> None:
    """An ingester died waiting for the commit's answer: whoever takes the transaction over
    sends the commit again. An Admin Module failing for a while (5xx) rolled it back, the
    target with it, though the dead ingester's commit may have been applied."""
    registered(world)
    world["rw-a"].files[FILE_ID] = DATA
    world.admin.commit_answers = [503] * 6
    mover = mover_of(admin=True)
    dead = Transaction(
        transaction_id="11111111-2222-3333-4444-555555555555",
        file_id=FILE_ID,
        owner="finalizer-dead",
        requested_by="alice",
        source=Copy("se-edit", "http://se-edit"),
        file=SourceFile("report.bin", "application/octet-stream", SHA256, len(DATA)),
        created_at=time.time(),
        updated_at=time.time(),
    )
    for state in (TxState.COPYING, TxState.COMMITTING):
        dead.move(state, time.time())
    dead.sending_to(Copy("rw-a", "http://rw-a"))
    with trio.fail_after(600):
        tx = await mover.take_over(dead)
    assert admin_points_at(world) == ("permanent", "rw-a")
    assert world.holding() == {"rw-a": SHA256}
    assert (tx.state, tx.error_code) == (TxState.DONE, None)
    assert world.admin.commits == 7
