"""The saga, with real processes: redis-server, reference Storage Elements, the Admin Module's
file registry (a small HTTP server of the test's), and ingesters under hypercorn.

- registration in the Admin Module, and a registration that fails → the stored copy removed;
- an ingester killed mid-upload, or while registering a stored file → another replica's
  janitor undoes the upload when the lease runs out;
- a compensation that cannot run now (its element is down) → kept in Redis, retried, done
  once the element is back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import TokenFactory
from tests.support.chaos import (
    PacedBody,
    artstore_ingester_env,
    download_sha256,
    late_writing_artstore,
    log_events,
    post_paced,
)
from tests.support.client import MIB, MultipartUpload, auth, post_upload, random_chunks
from tests.support.fixtures import KeyPair
from tests.support.http_server import Request, Response, serve_http
from tests.support.metrics import metric
from tests.support.processes import (
    ManagedProcess,
    StorageElementProcess,
    start_ingester,
    start_storage_element,
)
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually, eventually_async

LEASE_S = 2.0
JANITOR_S = 0.3


@dataclass
class World:
    root: Path
    keys: KeyPair
    redis: RedisServer
    a: StorageElementProcess
    b: StorageElementProcess
    procs: list[ManagedProcess] = field(default_factory=list)

    def element_files(self) -> dict[str, list[str]]:
        # The element's lock file is its own, not an upload's.
        return {
            se.element_id: [p.name for p in se.stored_files() if p.name != ".lock"]
            for se in (self.a, self.b)
        }

    def received(self, se: StorageElementProcess) -> int:
        """Bytes an element holds, its temporary files included (an upload in progress)."""
        total = 0
        for path in se.stored_files():
            if path.name != ".lock":
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size
        return total

    def saga_keys(self) -> list[bytes]:
        client = self.redis.client()
        try:
            return sorted(client.scan_iter("ingester:saga:*"))
        finally:
            client.close()

    async def ingester(
        self, name: str, *, elements: list[StorageElementProcess], **env: str
    ) -> ManagedProcess:
        settings = {
            "INGESTER_REDIS_URL": self.redis.url,
            "INGESTER_REDIS_TIMEOUT_S": "0.5",
            "INGESTER_SAGA_LEASE_S": str(LEASE_S),
            "INGESTER_SAGA_JANITOR_INTERVAL_S": str(JANITOR_S),
            "INGESTER_COMPENSATION_BACKOFF_MAX_S": "0.5",
            "INGESTER_SE_STALL_TIMEOUT_S": "5",
            **env,
        }

        def start() -> ManagedProcess:
            proc = start_ingester(
                self.root,
                name=name,
                public_key=self.keys.public_path,
                elements=[
                    se.registry_entry(priority=10 * (i + 1)) for i, se in enumerate(elements)
                ],
                env=settings,
            )
            self.procs.append(proc)
            proc.wait_ready()
            return proc

        return await trio.to_thread.run_sync(start)


@pytest.fixture
def world(tmp_path: Path, keypair: KeyPair) -> Iterator[World]:
    started: list[StorageElementProcess] = []
    world: World | None = None
    with RedisServer(tmp_path / "redis") as redis_server:
        try:
            for element_id in ("se-a", "se-b"):
                started.append(
                    start_storage_element(
                        tmp_path, element_id=element_id, mode="edit", public_key=keypair.public_path
                    )
                )
            world = World(tmp_path, keypair, redis_server, started[0], started[1])
            yield world
        finally:
            # The world's elements may have been restarted: stop the current ones too.
            current = [*world.procs, world.a, world.b] if world is not None else []
            for proc in [*current, *started]:
                proc.terminate()


@dataclass
class AdminModule:
    """The Admin Module's file registry, as far as the ingester uses it."""

    answer: Callable[[Request], Response] = lambda _: Response.json({"ok": True}, 201)
    hold: trio.Event | None = None
    posted: list[Request] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        if request.method == "POST" and request.path == "/api/v1/files":
            self.posted.append(request)
            if self.hold is not None:
                await self.hold.wait()
        return self.answer(request)


@contextlib.asynccontextmanager
async def admin_module(admin: AdminModule) -> AsyncIterator[str]:
    async with serve_http(admin.handle) as server:
        yield server.url


@contextlib.asynccontextmanager
async def registering_ingester(
    world: World, admin: AdminModule, *, attempts: int
) -> AsyncIterator[tuple[httpx.AsyncClient, ManagedProcess]]:
    """An ingester on se-a that registers with `admin`, `attempts` tries per registration
    (5xx retried quickly), and a client."""
    async with (
        admin_module(admin) as admin_url,
        httpx.AsyncClient(trust_env=False, timeout=30) as http,
    ):
        proc = await world.ingester(
            "ingester",
            elements=[world.a],
            INGESTER_ADMIN_URL=admin_url,
            INGESTER_ADMIN_MAX_ATTEMPTS=str(attempts),
            INGESTER_RETRY_BASE_S="0.05",
        )
        yield http, proc


async def metrics(http: httpx.AsyncClient, proc: ManagedProcess) -> str:
    response = await http.get(proc.url + "/metrics")
    assert response.status_code == 200
    return response.text


async def until(read: Callable[[], Awaitable[float]], value: float) -> None:
    """Poll an async reading (a metric of another process) until it equals `value`."""
    last: list[float] = []

    async def matches() -> bool:
        last[:] = [await read()]
        return last[0] == value

    for _ in range(100):
        if await matches():
            return
        await trio.sleep(0.1)
    raise AssertionError(f"still {last} after 10 s, not {value}")


# --- Admin Module registration ---------------------------------------------------------------


async def test_a_stored_upload_is_registered_in_the_admin_module(
    world: World, token_factory: TokenFactory
) -> None:
    admin = AdminModule()
    token = token_factory()
    with trio.fail_after(60):
        async with (
            admin_module(admin) as admin_url,
            httpx.AsyncClient(trust_env=False, timeout=30) as http,
        ):
            proc = await world.ingester(
                "ingester", elements=[world.a], INGESTER_ADMIN_URL=admin_url
            )
            body = MultipartUpload(list(random_chunks(300_000)), fields=[("description", "d")])
            response = await post_upload(http, proc.url, token, body)
            assert response.status_code == 201, response.text
            result = response.json()
            assert len(admin.posted) == 1
            record: dict[str, Any] = admin.posted[0].json()
            assert record["file_id"] == result["file_id"]
            assert record["checksum"] == body.sha256 == result["checksum"]
            assert record["storage_element_id"] == "se-a"
            assert record["file_size"] == 300_000
            assert record["description"] == "d"
            assert record["uploaded_by"] == "test-user"
            # How to read the stored bytes back, whatever the element keeps.
            assert record["compression"] == {
                "compressed": False,
                "compression_algorithm": None,
                "original_size": 300_000,
                "original_checksum": body.sha256,
                "stored_size": 300_000,
                "stored_checksum": body.sha256,
                "stored_filename": "data.bin",
                "stored_content_type": "application/octet-stream",
            }
            assert admin.posted[0].headers["authorization"] == f"Bearer {token}"
            assert await download_sha256(http, world.a.url, result["file_id"], token, None) == (
                body.sha256,
                body.size,
            )
            text = await metrics(http, proc)
            assert metric(text, 'ingester_admin_registrations_total{outcome="ok"}') == 1
            # Nothing left in the saga store once the upload is acknowledged; its owner is
            # recorded beside it, for its retention (30 days and a day's grace).
            assert world.saga_keys() == []
            client = world.redis.client()
            try:
                owner_key = f"ingester:owner:{result['file_id']}"
                owner = client.get(owner_key)
                assert isinstance(owner, bytes)
                assert json.loads(owner)["subject"] == "test-user"
                assert 30 * 86400 < client.ttl(owner_key) <= 31 * 86400
            finally:
                client.close()


async def test_a_failing_registration_removes_the_stored_copy(
    world: World, token_factory: TokenFactory
) -> None:
    admin = AdminModule(answer=lambda _: Response.json({"detail": "database down"}, 500))
    token = token_factory()
    with trio.fail_after(60):
        async with registering_ingester(world, admin, attempts=3) as (http, proc):
            response = await post_upload(http, proc.url, token, MultipartUpload([b"x" * 50_000]))
            assert response.status_code == 502, response.text
            assert response.json()["error"]["code"] == "ADMIN_REGISTRATION_FAILED"
            assert "500" in response.json()["error"]["message"]
            # Retried as a 5xx may be, then given up.
            assert len(admin.posted) == 3
            file_id = admin.posted[0].json()["file_id"]
            # The bytes had been stored; the answer comes once they are removed again.
            assert world.element_files() == {"se-a": [], "se-b": []}
            gone = await http.get(f"{world.a.url}/api/v1/files/{file_id}", headers=auth(token))
            assert gone.status_code == 404
            # The record goes once the handler is done with it (`SagaBook.end`, in the
            # background): soon after the answer, not before it.
            await eventually(lambda: world.saga_keys() == [], timeout_s=5)
            text = await metrics(http, proc)
            assert metric(text, 'ingester_admin_registrations_total{outcome="failed"}') == 1
            assert metric(text, 'ingester_compensations_total{outcome="done"}') >= 1

            # A registry that refuses outright (4xx) is not retried; and the service keeps
            # serving: once the registry answers again, uploads succeed.
            admin.posted.clear()
            admin.answer = lambda _: Response.json({"detail": "bad record"}, 422)
            response = await post_upload(http, proc.url, token, MultipartUpload([b"y" * 10]))
            assert response.status_code == 502
            assert len(admin.posted) == 1
            admin.answer = lambda _: Response.json({}, 201)
            response = await post_upload(http, proc.url, token, MultipartUpload([b"z" * 10]))
            assert response.status_code == 201, response.text
            assert world.element_files()["se-a"] != []


async def test_a_registration_that_took_though_unanswered_is_not_undone(
    world: World, token_factory: TokenFactory
) -> None:
    """The Admin Module registers the file but answers 504 (a proxy's timeout, say). Taken
    for a failure, the upload was undone and the Admin Module named a removed file. A
    failure that is no refusal is now checked against the Admin Module's record: there, the
    upload is acknowledged and its copy kept."""
    registered: dict[str, dict[str, Any]] = {}

    def answer(request: Request) -> Response:
        if request.method == "POST":
            record = request.json()
            registered[record["file_id"]] = record
            return Response.json({"detail": "gateway timeout"}, 504)
        file_id = request.path.rsplit("/", 1)[1]
        if file_id in registered:
            return Response.json(registered[file_id])
        return Response.json({"detail": "not found"}, 404)

    admin = AdminModule(answer=answer)
    token = token_factory()
    with trio.fail_after(60):
        async with registering_ingester(world, admin, attempts=2) as (http, proc):
            body = MultipartUpload([b"r" * 70_000])
            response = await post_upload(http, proc.url, token, body)
            assert response.status_code == 201, response.text
            file_id = response.json()["file_id"]
            assert list(registered) == [file_id]
            assert await download_sha256(http, world.a.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )
            await eventually(lambda: world.saga_keys() == [], timeout_s=5)


# --- a killed ingester -----------------------------------------------------------------------


async def test_a_killed_ingester_s_stored_file_is_removed_by_another_replica(
    world: World, token_factory: TokenFactory
) -> None:
    # The worst moment: the element has committed the file, the Admin Module has not
    # answered yet, and the ingester dies. No client was told; the copy must go.
    hold = trio.Event()
    admin = AdminModule(hold=hold)
    token = token_factory()
    with trio.fail_after(90):
        async with (
            admin_module(admin) as admin_url,
            httpx.AsyncClient(trust_env=False, timeout=30) as http,
        ):
            one = await world.ingester("one", elements=[world.a], INGESTER_ADMIN_URL=admin_url)
            two = await world.ingester("two", elements=[world.a], INGESTER_ADMIN_URL=admin_url)
            outcome: list[BaseException | httpx.Response] = []

            async def client() -> None:
                try:
                    outcome.append(
                        await post_upload(http, one.url, token, MultipartUpload([b"k" * 200_000]))
                    )
                except httpx.HTTPError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                await eventually(lambda: len(admin.posted) == 1, timeout_s=20)
                file_id = admin.posted[0].json()["file_id"]
                assert len(world.element_files()["se-a"]) == 2  # data + attr.json
                assert len(world.saga_keys()) >= 1
                one.kill()
            assert isinstance(outcome[0], httpx.HTTPError)  # no answer, certainly no 201

            # Within the lease plus a janitor round or two, the other replica removes it.
            took = await eventually(
                lambda: world.element_files()["se-a"] == [], timeout_s=LEASE_S + 10
            )
            gone = await http.get(f"{world.a.url}/api/v1/files/{file_id}", headers=auth(token))
            assert gone.status_code == 404
            await eventually(lambda: world.saga_keys() == [], timeout_s=5)
            assert metric(await metrics(http, two), "ingester_saga_takeovers_total") == 1
            assert took < LEASE_S + 10
            hold.set()


async def test_an_ingester_killed_mid_stream_leaves_nothing_behind(
    world: World, token_factory: TokenFactory
) -> None:
    token = token_factory()
    with trio.fail_after(90):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            one = await world.ingester("one", elements=[world.a])
            two = await world.ingester("two", elements=[world.a])
            body = MultipartUpload(list(random_chunks(16 * MIB, chunk=256 * 1024)))

            async def client() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    await post_paced(http, one.url, token, body, PacedBody(body, bytes_per_s=5e6))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                # The element is receiving (its temporary file grows) and the saga says so.
                await eventually(lambda: world.saga_keys() != [], timeout_s=20)
                await eventually(lambda: world.received(world.a) >= 2 * MIB, timeout_s=20)
                one.kill()
                nursery.cancel_scope.cancel()

            await eventually(lambda: world.saga_keys() == [], timeout_s=LEASE_S + 10)
            await eventually(lambda: world.element_files()["se-a"] == [], timeout_s=10)
            assert metric(await metrics(http, two), "ingester_saga_takeovers_total") == 1
            # And the survivor still serves.
            response = await post_upload(http, two.url, token, MultipartUpload([b"ok"]))
            assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "size",
    [
        200_000,  # small: the first saga write says the copy may land
        3 * MIB,  # the saga writes it before the body's last piece
    ],
)
async def test_a_file_an_element_stores_after_its_ingester_died_is_removed(
    world: World, token_factory: TokenFactory, size: int
) -> None:
    """artStore's element writes the file after the last byte, and finishes it for a caller
    long gone. The ingester dies between the two; the replica that takes its saga over finds
    nothing at first (`already_deleted`). The record says the copy may still land (written
    before the body's last piece went, or from the first write for a small body), so it asks
    again until the recheck window closes, and removes the file once it has landed. Nothing
    is left. (A body that never ended leaves no such note: the test before this one.)"""
    # Longer than the lease plus a janitor round: the takeover comes before the file.
    late = late_writing_artstore(
        world.root, world.keys, element_id="as-late", mode="edit", write_delay_s=LEASE_S + 4
    )
    world.procs.append(late)
    service = token_factory(sub="ingester-svc", name="ingester-svc")
    env = artstore_ingester_env(service)
    token = token_factory()

    def received() -> list[str]:
        return [line["file_id"] for line in log_events(late, "se_body_received")]

    def stored() -> list[str]:
        return [p.name for p in late.stored_files() if p.name != ".lock"]

    with trio.fail_after(90):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            one = await world.ingester("one", elements=[late], **env)
            two = await world.ingester("two", elements=[late], **env)

            # What the client got, should the element never see the body (a CI run once
            # waited the whole 20 s for it, with nothing to say why).
            answered: list[str] = []

            async def client() -> None:
                try:
                    response = await post_upload(
                        http, one.url, token, MultipartUpload([b"L" * size])
                    )
                    answered.append(f"{response.status_code} {response.text[:300]}")
                except httpx.HTTPError as exc:
                    answered.append(repr(exc))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                # Every byte is on the element, which writes the file now; the ingester dies.
                try:
                    await eventually(lambda: received() != [], timeout_s=20)
                except trio.TooSlowError:
                    raise AssertionError(
                        f"the element never received the body; the client got {answered}\n"
                        f"ingester:\n{one.log_tail()}\nelement:\n{late.log_tail()}"
                    ) from None
                one.kill()
                nursery.cancel_scope.cancel()

            # The other replica takes the saga over before the file lands, and removes it
            # once it has.
            await eventually(lambda: stored() != [], timeout_s=LEASE_S + 15)
            await eventually(lambda: stored() == [] and world.saga_keys() == [], timeout_s=20)
            assert metric(await metrics(http, two), "ingester_saga_takeovers_total") == 1
            (file_id,) = received()
            gone = await http.get(f"{late.url}/api/v1/files/{file_id}", headers=auth(service))
            assert gone.status_code == 404


# --- durable compensation --------------------------------------------------------------------


async def test_a_caller_s_upload_id_stays_taken_while_its_copy_is_being_removed(
    world: World, token_factory: TokenFactory
) -> None:
    """Found by a review. An upload under the caller's own `X-Upload-ID` fails with a copy
    its element (down) cannot remove yet; its progress record goes after the retention, but
    its saga stays until the copy is gone. A retry under the same id was accepted: the two
    sagas shared one record and one lease, and the first one's end removed the second's
    (its upload then failed, or another replica undid it). The id is in use until then."""
    token = token_factory()
    upload_id = "6f1c7a0e-0d5e-4c44-9a43-2f4d8f3f9c11"
    with trio.fail_after(120):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            proc = await world.ingester(
                "ingester",
                elements=[world.a],
                INGESTER_COMPENSATION_TIMEOUT_S="1",
                INGESTER_PROGRESS_RETENTION_S="0.5",
                INGESTER_RETRY_MAX_ATTEMPTS="1",
            )
            body = MultipartUpload(list(random_chunks(12 * MIB, chunk=256 * 1024)))
            result: list[httpx.Response] = []

            async def client() -> None:
                paced = PacedBody(body, bytes_per_s=12e6)
                result.append(
                    await post_paced(
                        http, proc.url, token, body, paced, **{"X-Upload-ID": upload_id}
                    )
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                await eventually(lambda: world.received(world.a) >= 2 * MIB, timeout_s=20)
                world.a.kill()  # the copy cannot be removed while se-a is down
            assert result[0].status_code == 503, result[0].text

            async def progress_gone() -> bool:
                answer = await http.get(
                    f"{proc.url}/api/v1/files/uploads/{upload_id}", headers=auth(token)
                )
                return answer.status_code == 404

            # Finished entries past their retention are forgotten every 30 s.
            await eventually_async(progress_gone, timeout_s=40)
            again = await post_upload(
                http, proc.url, token, MultipartUpload([b"again"]),
                headers={"X-Upload-ID": upload_id},
            )  # fmt: skip
            assert again.status_code == 409, again.text
            assert again.json()["error"]["code"] == "UPLOAD_ID_IN_USE"
            assert "retry-after" in again.headers

            # se-a back: the copy goes, and the id is free again.
            port = int(world.a.url.rsplit(":", 1)[1])
            world.a = await trio.to_thread.run_sync(
                lambda: start_storage_element(
                    world.root, element_id="se-a", mode="edit",
                    public_key=world.keys.public_path, port=port, data_dir=world.a.data_dir,
                )
            )  # fmt: skip
            await eventually(lambda: world.element_files()["se-a"] == [], timeout_s=20)
            await eventually(lambda: world.saga_keys() == [], timeout_s=20)

            async def ready() -> bool:
                return (await http.get(f"{proc.url}/health/ready")).status_code == 200

            await eventually_async(ready, timeout_s=20)  # se-a probed back in
            last = await post_upload(
                http, proc.url, token, MultipartUpload([b"last"]),
                headers={"X-Upload-ID": upload_id},
            )  # fmt: skip
            assert last.status_code == 201, last.text
            assert last.json()["upload_id"] == upload_id


async def test_a_compensation_that_cannot_run_now_is_retried_until_done(
    world: World, token_factory: TokenFactory
) -> None:
    token = token_factory()
    with trio.fail_after(120):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            proc = await world.ingester(
                "ingester",
                elements=[world.a, world.b],
                INGESTER_COMPENSATION_TIMEOUT_S="1",
            )
            body = MultipartUpload(list(random_chunks(12 * MIB, chunk=256 * 1024)))
            result: list[httpx.Response] = []

            async def client() -> None:
                paced = PacedBody(body, bytes_per_s=12e6)
                result.append(await post_paced(http, proc.url, token, body, paced))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                await eventually(lambda: world.received(world.a) >= 2 * MIB, timeout_s=20)
                # se-a dies with part of the file: the upload fails over to se-b, and the
                # removal of se-a's part cannot run while se-a is down.
                world.a.kill()
            response = result[0]
            assert response.status_code == 201, response.text
            file_id = response.json()["file_id"]
            assert response.json()["storage_element_id"] == "se-b"
            assert await download_sha256(http, world.b.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )

            # Kept in Redis, counted in the backlog, retried.
            await eventually(lambda: world.saga_keys() != [], timeout_s=5)

            async def backlog() -> float:
                return metric(await metrics(http, proc), "ingester_compensation_backlog")

            await until(backlog, 1)
            record = json.loads(
                world.redis.client().hget(f"ingester:saga:{response.json()['upload_id']}", "record")
                or b"{}"
            )
            assert record["state"] == "compensating"
            assert [c[0] for c in record["copies"]] == ["se-a"]

            async def retried() -> float:
                text = await metrics(http, proc)
                return min(metric(text, 'ingester_compensations_total{outcome="retry"}'), 2)

            # Retried at least twice while se-a is down (backoff from 1 s).
            await until(retried, 2)

            # se-a back (same port, same data): the compensation goes through, the record goes.
            def restart() -> None:
                port = int(world.a.url.rsplit(":", 1)[1])
                world.a = start_storage_element(
                    world.root,
                    element_id="se-a",
                    mode="edit",
                    public_key=world.keys.public_path,
                    port=port,
                    data_dir=world.a.data_dir,
                )

            await trio.to_thread.run_sync(restart)
            await eventually(lambda: world.saga_keys() == [], timeout_s=15)
            await until(backlog, 0)
            assert world.element_files()["se-a"] == []
            gone = await http.get(f"{world.a.url}/api/v1/files/{file_id}", headers=auth(token))
            assert gone.status_code == 404
            assert await download_sha256(http, world.b.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )
