"""Finalization under failure, with real processes: redis-server, reference Storage Elements
(one `edit` source, two `rw` targets), a fake Admin Module (a small HTTP server of the test's),
a fault proxy in front of the preferred target, and ingesters under hypercorn.

- the target element killed mid-copy → the move fails over to the other rw element; the killed
  one holds nothing of the file once restarted;
- the Admin Module failing the commit (5xx: it may have applied it) → still `committing`, the
  target kept, the commit sent again; refusing it (4xx) → rolled back: the target copy removed,
  the source intact (and a later finalize, once the Admin Module accepts, succeeds);
- the ingester SIGKILLed between the commit and the source delete → a restarted ingester on the
  same Redis takes the transaction over and deletes the source;
- the ingester SIGKILLed while the Admin Module had not answered the commit → the restarted
  one commits again and finishes (the commit may have been applied);
- the ingester SIGKILLed mid-copy → the restarted one rolls back: no target copy, source intact;
- two replicas asked to finalize the same file at once → one 202, one 409.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import TokenFactory
from tests.support.chaos import (
    artstore_ingester_env,
    download_sha256,
    late_writing_artstore,
    log_events,
)
from tests.support.client import MIB, MultipartUpload, auth, post_upload, random_chunks
from tests.support.fault_proxy import Fault, FaultPlan, serve_fault_proxy
from tests.support.fixtures import KeyPair
from tests.support.http_server import Request, Response, serve_http
from tests.support.processes import (
    ManagedProcess,
    StorageElementProcess,
    start_ingester,
    start_storage_element,
)
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually

LEASE_S = 1.5
POLL_S = 0.05


@dataclass
class World:
    root: Path
    keys: KeyPair
    redis: RedisServer
    edit: StorageElementProcess
    rw_a: StorageElementProcess
    rw_b: StorageElementProcess
    procs: list[ManagedProcess] = field(default_factory=list)

    async def ingester(
        self, name: str, *, rw_a_url: str | None = None, **env: str
    ) -> ManagedProcess:
        """An ingester on the world's Redis; rw-a (priority 10, preferred) may sit behind a
        proxy, rw-b (priority 20) is direct."""
        entries: list[dict[str, object]] = [
            self.edit.registry_entry(priority=10),
            {**self.rw_a.registry_entry(priority=10), "api_url": rw_a_url or self.rw_a.url},
            self.rw_b.registry_entry(priority=20),
        ]
        settings = {
            "INGESTER_REDIS_URL": self.redis.url,
            "INGESTER_REDIS_TIMEOUT_S": "0.5",
            "INGESTER_FINALIZE_LEASE_S": str(LEASE_S),
            "INGESTER_FINALIZE_JANITOR_INTERVAL_S": "0.3",
            "INGESTER_COMPENSATION_BACKOFF_MAX_S": "0.5",
            "INGESTER_SE_STALL_TIMEOUT_S": "5",
            "INGESTER_FINALIZE_SOURCE_DELETE_DELAY_S": "0",
            **env,
        }

        def start() -> ManagedProcess:
            proc = start_ingester(
                self.root,
                name=name,
                public_key=self.keys.public_path,
                elements=entries,
                env=settings,
            )
            self.procs.append(proc)
            proc.wait_ready()
            return proc

        return await trio.to_thread.run_sync(start)

    async def restart_rw_a(self) -> None:
        old = self.rw_a
        self.rw_a = await trio.to_thread.run_sync(
            lambda: start_storage_element(
                self.root,
                element_id=old.element_id,
                mode="rw",
                public_key=self.keys.public_path,
                port=int(old.url.rsplit(":", 1)[1]),
                data_dir=old.data_dir,
            )
        )


@pytest.fixture
def world(tmp_path: Path, keypair: KeyPair) -> Iterator[World]:
    started: list[StorageElementProcess] = []
    world: World | None = None
    with RedisServer(tmp_path / "redis") as redis_server:
        try:
            for element_id, mode in (("se-edit", "edit"), ("rw-a", "rw"), ("rw-b", "rw")):
                started.append(
                    start_storage_element(
                        tmp_path, element_id=element_id, mode=mode, public_key=keypair.public_path
                    )
                )
            world = World(tmp_path, keypair, redis_server, started[0], started[1], started[2])
            yield world
        finally:
            current = [*world.procs, world.rw_a] if world is not None else []
            for proc in [*current, *started]:
                proc.terminate()


@dataclass
class AdminModule:
    """The Admin Module's file registry: registrations kept, lookups answered from them, and
    commits answered by `commit_status`."""

    commit_status: int = 200
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    # While set and not yet fired, commits hang (the ingester waits for the answer).
    hold: trio.Event | None = None

    async def handle(self, request: Request) -> Response:
        path = request.path
        if request.method == "POST" and path == "/api/v1/files":
            record = request.json()
            self.files[record["file_id"]] = record
            return Response.json(record, 201)
        file_id = path.rsplit("/", 1)[-1]
        if request.method == "GET" and path.startswith("/api/v1/files/"):
            if file_id not in self.files:
                return Response.json({"detail": "not found"}, 404)
            return Response.json(self.files[file_id])
        if request.method == "PUT" and path.startswith("/api/v1/files/"):
            self.commits.append(request.json())
            if self.hold is not None:
                await self.hold.wait()
            if self.commit_status >= 300:
                return Response.json({"detail": "boom"}, self.commit_status)
            self.files[file_id] = self.files.get(file_id, {}) | request.json()
            return Response.json(self.files[file_id])
        return Response.json({"detail": "no route"}, 404)


@contextlib.asynccontextmanager
async def admin_module(admin: AdminModule) -> AsyncIterator[str]:
    async with serve_http(admin.handle) as server:
        yield server.url


def files_of(se: StorageElementProcess, file_id: str) -> list[Path]:
    found = []
    for path in se.stored_files():
        if path.name == ".lock":
            continue
        if path.name.endswith(".attr.json"):
            if json.loads(path.read_text()).get("file_id") == file_id:
                found.append(path)
        elif file_id in path.name or ".tmp" in path.parts:
            found.append(path)
    return found


async def upload(
    http: httpx.AsyncClient, url: str, token: str, size: int, seed: int
) -> tuple[str, MultipartUpload]:
    body = MultipartUpload(
        random_chunks(size, seed=seed),
        fields=[("retention_policy", "temporary"), ("compress", "false")],
    )
    response = await post_upload(http, url, token, body)
    assert response.status_code == 201, response.text
    assert response.json()["storage_element_id"] == "se-edit"
    return str(response.json()["file_id"]), body


async def finalize(http: httpx.AsyncClient, url: str, token: str, file_id: str) -> str:
    response = await http.post(f"{url}/api/v1/finalize/{file_id}", headers=auth(token))
    assert response.status_code == 202, response.text
    return str(response.json()["transaction_id"])


async def status(http: httpx.AsyncClient, url: str, token: str, tx_id: str) -> dict[str, Any]:
    response = await http.get(f"{url}/api/v1/finalize/{tx_id}/status", headers=auth(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_status(
    http: httpx.AsyncClient, url: str, token: str, tx_id: str, states: set[str]
) -> dict[str, Any]:
    while True:
        body = await status(http, url, token, tx_id)
        if body["status"] in states:
            return body
        await trio.sleep(POLL_S)


async def until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    await eventually(check, timeout_s=timeout_s)


async def test_target_killed_mid_copy_fails_over_and_leaves_no_orphan(
    world: World, token_factory: TokenFactory
) -> None:
    token = token_factory()
    size = 64 * MIB
    with trio.fail_after(120):
        async with (
            trio.open_nursery() as nursery,
            httpx.AsyncClient(trust_env=False, timeout=60) as http,
        ):
            proxy = await nursery.start(
                serve_fault_proxy, "127.0.0.1", int(world.rw_a.url.rsplit(":", 1)[1])
            )
            proc = await world.ingester("ingester", rw_a_url=proxy.url)
            file_id, body = await upload(http, proc.url, token, size, seed=64)
            # Slow enough to be caught mid-copy: ~2 s for 64 MiB.
            proxy.set_plan(FaultPlan(Fault.THROTTLE, bytes_per_s=32 * MIB))
            tx_id = await finalize(http, proc.url, token, file_id)
            await until(lambda: proxy.bytes_upstream > 8 * MIB)
            world.rw_a.kill()
            proxy.heal()
            # Committed on rw-b and the source deleted; the transaction is done only once the
            # partial copy on rw-a is confirmed gone, which needs rw-a back.
            while True:
                moved = await status(http, proc.url, token, tx_id)
                assert moved["status"] in {"copying", "committed"}, moved
                if moved["source_deleted"]:
                    break
                await trio.sleep(POLL_S)
            assert moved["status"] == "committed"
            assert moved["storage_element_id"] == "rw-b"
            assert await download_sha256(http, world.rw_b.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )
            assert files_of(world.edit, file_id) == []
            await world.restart_rw_a()
            done = await wait_status(http, proc.url, token, tx_id, {"done", "rolled_back"})
            assert done["status"] == "done", done
            # The killed element, back: nothing of the file.
            assert files_of(world.rw_a, file_id) == []
            gone = await http.get(
                f"{world.rw_a.url}/api/v1/gc/{file_id}/exists", headers=auth(token)
            )
            assert gone.json()["exists"] is False
            text = (await http.get(proc.url + "/metrics")).text
            assert 'ingester_finalize_failovers_total{element_id="rw-a"} 1.0' in text
            nursery.cancel_scope.cancel()


async def test_admin_commit_failing_is_sent_again_and_a_refusal_rolls_back(
    world: World, token_factory: TokenFactory
) -> None:
    token = token_factory()
    admin = AdminModule(commit_status=503)
    with trio.fail_after(90):
        async with (
            admin_module(admin) as admin_url,
            httpx.AsyncClient(trust_env=False, timeout=60) as http,
        ):
            proc = await world.ingester(
                "ingester", INGESTER_ADMIN_URL=admin_url, INGESTER_ADMIN_TIMEOUT_S="2"
            )
            file_id, body = await upload(http, proc.url, token, 5 * MIB, seed=500)
            assert file_id in admin.files
            tx_id = await finalize(http, proc.url, token, file_id)
            # A 5xx says nothing of whether the commit was applied: the move waits in
            # `committing` with its target whole, and sends the commit again (each round is
            # INGESTER_ADMIN_MAX_ATTEMPTS, 3, attempts).
            await until(lambda: len(admin.commits) > 3)
            held = await status(http, proc.url, token, tx_id)
            assert held["status"] == "committing", held
            assert files_of(world.rw_a, file_id)
            # A refusal rolls back.
            admin.commit_status = 422
            failed = await wait_status(http, proc.url, token, tx_id, {"done", "rolled_back"})
            assert failed["status"] == "rolled_back", failed
            assert failed["error"]["code"] == "ADMIN_COMMIT_FAILED"
            assert [h["state"] for h in failed["history"]] == [
                "pending",
                "copying",
                "committing",
                "rolling_back",
                "rolled_back",
            ]
            assert admin.commits, "the commit was never attempted"
            assert admin.commits[0]["retention_policy"] == "permanent"
            assert admin.commits[0]["storage_element_id"] == "rw-a"
            assert admin.commits[0]["finalized_at"]
            # Target copy removed, source intact.
            assert files_of(world.rw_a, file_id) == []
            assert files_of(world.rw_b, file_id) == []
            assert await download_sha256(http, world.edit.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )

            # The file can be finalized again once the Admin Module accepts.
            admin.commit_status = 200
            tx2 = await finalize(http, proc.url, token, file_id)
            done = await wait_status(http, proc.url, token, tx2, {"done", "rolled_back"})
            assert done["status"] == "done", done
            assert admin.files[file_id]["retention_policy"] == "permanent"
            assert await download_sha256(http, world.rw_a.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )
            assert files_of(world.edit, file_id) == []
            # Now permanent in the Admin Module: 409.
            again = await http.post(f"{proc.url}/api/v1/finalize/{file_id}", headers=auth(token))
            assert again.status_code == 409


async def test_ingester_killed_between_commit_and_source_delete(
    world: World, token_factory: TokenFactory
) -> None:
    token = token_factory()
    with trio.fail_after(90):
        async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
            first = await world.ingester("first", INGESTER_FINALIZE_SOURCE_DELETE_DELAY_S="4")
            file_id, body = await upload(http, first.url, token, 4 * MIB, seed=44)
            tx_id = await finalize(http, first.url, token, file_id)
            committed = await wait_status(http, first.url, token, tx_id, {"committed", "done"})
            assert committed["status"] == "committed"
            first.kill()
            # Committed: the new copy is there, the old one waits for its delete.
            assert await download_sha256(http, world.rw_a.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )
            assert files_of(world.edit, file_id)

            second = await world.ingester("second")
            done = await wait_status(http, second.url, token, tx_id, {"done", "rolled_back"})
            assert done["status"] == "done", done
            assert done["source_deleted"] is True
            assert files_of(world.edit, file_id) == []
            assert await download_sha256(http, world.rw_a.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )
            text = (await http.get(second.url + "/metrics")).text
            assert "ingester_finalize_takeovers_total 1.0" in text


async def test_ingester_killed_during_the_commit_commits_again_on_restart(
    world: World, token_factory: TokenFactory
) -> None:
    """The commit's answer never came: the Admin Module may have applied it, so the next
    ingester sends it again (rather than removing the target) and finishes the move."""
    token = token_factory()
    admin = AdminModule(hold=trio.Event())
    with trio.fail_after(90):
        async with (
            admin_module(admin) as admin_url,
            httpx.AsyncClient(trust_env=False, timeout=60) as http,
        ):
            first = await world.ingester(
                "first", INGESTER_ADMIN_URL=admin_url, INGESTER_ADMIN_TIMEOUT_S="30"
            )
            file_id, body = await upload(http, first.url, token, 3 * MIB, seed=3)
            tx_id = await finalize(http, first.url, token, file_id)
            await until(lambda: len(admin.commits) == 1)
            assert (await status(http, first.url, token, tx_id))["status"] == "committing"
            first.kill()
            assert admin.hold is not None
            admin.hold.set()
            admin.hold = None

            second = await world.ingester("second", INGESTER_ADMIN_URL=admin_url)
            done = await wait_status(http, second.url, token, tx_id, {"done", "rolled_back"})
            assert done["status"] == "done", done
            assert len(admin.commits) == 2
            assert {c["storage_element_id"] for c in admin.commits} == {"rw-a"}
            assert admin.files[file_id]["retention_policy"] == "permanent"
            assert await download_sha256(http, world.rw_a.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )
            assert files_of(world.edit, file_id) == []


async def test_ingester_killed_mid_copy_is_rolled_back_by_the_next(
    world: World, token_factory: TokenFactory
) -> None:
    token = token_factory()
    with trio.fail_after(120):
        async with (
            trio.open_nursery() as nursery,
            httpx.AsyncClient(trust_env=False, timeout=60) as http,
        ):
            proxy = await nursery.start(
                serve_fault_proxy, "127.0.0.1", int(world.rw_a.url.rsplit(":", 1)[1])
            )
            first = await world.ingester("first", rw_a_url=proxy.url)
            file_id, body = await upload(http, first.url, token, 32 * MIB, seed=32)
            proxy.set_plan(FaultPlan(Fault.THROTTLE, bytes_per_s=8 * MIB))
            tx_id = await finalize(http, first.url, token, file_id)
            await until(lambda: proxy.bytes_upstream > 4 * MIB)
            first.kill()
            proxy.heal()

            second = await world.ingester("second", rw_a_url=proxy.url)
            rolled = await wait_status(http, second.url, token, tx_id, {"done", "rolled_back"})
            assert rolled["status"] == "rolled_back", rolled
            assert rolled["error"]["code"] == "INTERRUPTED"
            await until(lambda: files_of(world.rw_a, file_id) == [])
            assert files_of(world.rw_b, file_id) == []
            assert await download_sha256(http, world.edit.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )
            nursery.cancel_scope.cancel()


async def test_a_copy_artstore_stores_after_its_ingester_died_is_removed(
    world: World, token_factory: TokenFactory
) -> None:
    """artStore's element writes the file after the last byte, and finishes it for a caller
    long gone. The ingester moving a file dies between the two; the one taking the move over
    rolls it back and finds nothing on the target at first (`already_deleted`). The record
    says the copy may still land (written before its last piece went), so it asks again and
    removes the copy once it has landed. The source is untouched, nothing else is left."""
    # Longer than the lease, a janitor round and a start: the rollback comes first.
    target = await trio.to_thread.run_sync(
        lambda: late_writing_artstore(
            world.root, world.keys, element_id="as-rw", mode="rw", write_delay_s=LEASE_S + 8
        )
    )
    world.procs.append(target)
    service = token_factory(sub="ingester-svc", name="ingester-svc")
    env = artstore_ingester_env(service)
    token = token_factory()

    def received() -> bool:
        return bool(log_events(target, "se_body_received"))

    def stored() -> list[Path]:
        return [p for p in target.stored_files() if p.name != ".lock"]

    def deleted() -> list[str]:
        """File ids the target removed."""
        return [line["file_id"] for line in log_events(target, "se_deleted")]

    with trio.fail_after(120):
        async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
            first = await world.ingester("first", rw_a_url=target.url, **env)
            file_id, body = await upload(http, first.url, token, 3 * MIB, seed=33)
            tx_id = await finalize(http, first.url, token, file_id)
            # The whole copy is on the target, which writes it now; the ingester dies.
            await eventually(received, timeout_s=30)
            first.kill()

            second = await world.ingester("second", rw_a_url=target.url, **env)
            rolled = await wait_status(http, second.url, token, tx_id, {"done", "rolled_back"})
            assert rolled["status"] == "rolled_back", rolled
            # The rollback's first removals found nothing; it ended only once the copy had
            # landed and a removal took it. Without the window it ends at once, and the copy
            # lands after it and stays.
            # (That removal found the file: the target's one write is behind us.)
            assert deleted() == [file_id]
            assert stored() == []
            assert files_of(world.rw_b, file_id) == []
            assert await download_sha256(http, world.edit.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )


async def test_two_replicas_finalizing_the_same_file_one_wins(
    world: World, token_factory: TokenFactory
) -> None:
    token = token_factory()
    with trio.fail_after(90):
        async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
            a = await world.ingester("a")
            b = await world.ingester("b")
            file_id, body = await upload(http, a.url, token, 2 * MIB, seed=2)
            answers: list[httpx.Response] = []

            async def post(url: str) -> None:
                answers.append(
                    await http.post(f"{url}/api/v1/finalize/{file_id}", headers=auth(token))
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(post, a.url)
                nursery.start_soon(post, b.url)
            assert sorted(r.status_code for r in answers) == [202, 409]
            loser = next(r for r in answers if r.status_code == 409)
            assert loser.json()["error"]["code"] == "FINALIZATION_IN_PROGRESS"
            tx_id = next(r for r in answers if r.status_code == 202).json()["transaction_id"]
            # Either replica answers the status: it is in Redis.
            done = await wait_status(http, b.url, token, tx_id, {"done", "rolled_back"})
            assert done["status"] == "done", done
            assert await download_sha256(http, world.rw_a.url, file_id, token, None) == (
                body.sha256,
                body.size,
            )
            assert files_of(world.rw_b, file_id) == []
            assert files_of(world.edit, file_id) == []
            # The admin list comes from Redis: both replicas show the transaction.
            for replica in (a, b):
                listed = await http.get(
                    f"{replica.url}/api/v1/finalize?state=done",
                    headers=auth(token_factory(role="admin")),
                )
                assert listed.status_code == 200
                assert [t["transaction_id"] for t in listed.json()["transactions"]] == [tx_id]
