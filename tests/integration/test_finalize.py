"""Finalization (temporary → permanent) with real processes: the module's two reference
Storage Elements (`se-edit`, `se-rw`) and ingesters under hypercorn, no Redis (transactions in
the process). What a user checks: status codes, the bytes on the rw element (sha256 of a
download), the files in each element's data directory, who may see what.

The kill scenarios (target element, ingester, Admin Module) are in
`tests/chaos/test_finalize_chaos.py`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.support.client import MIB, MultipartUpload, auth, post_upload, random_chunks
from tests.support.metrics import metric
from tests.support.processes import ManagedProcess, StorageElementProcess

POLL_S = 0.05


@pytest.fixture(scope="module")
def finalizer(stack: Stack) -> Iterator[ManagedProcess]:
    """An ingester of the stack whose source deletes come 1 s after the commit."""
    proc = stack.start_ingester("finalizer", INGESTER_FINALIZE_SOURCE_DELETE_DELAY_S="1")
    try:
        yield proc
    finally:
        proc.terminate()


async def upload_temporary(
    http: httpx.AsyncClient, url: str, token: str, size: int, *, seed: int = 5
) -> tuple[dict[str, Any], MultipartUpload]:
    body = MultipartUpload(
        list(random_chunks(size, seed=seed))
        if size <= 64 * MIB
        else random_chunks(size, seed=seed),
        fields=[
            ("retention_policy", "temporary"),
            ("compress", "false"),
            ("description", "quarterly report"),
            ("metadata", json.dumps({"project": "apollo", "n": 3})),
        ],
        filename="report final.bin",
    )
    response = await post_upload(http, url, token, body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    assert result["storage_element_id"] == "se-edit"
    return result, body


async def wait_status(
    http: httpx.AsyncClient, url: str, token: str, tx_id: str, states: set[str]
) -> dict[str, Any]:
    while True:
        response = await http.get(f"{url}/api/v1/finalize/{tx_id}/status", headers=auth(token))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in states:
            return body
        await trio.sleep(POLL_S)


def files_of(se: StorageElementProcess, file_id: str) -> list[Path]:
    """The element's data and attr files of this file id (the .tmp area included)."""
    found = []
    for path in se.stored_files():
        if path.name.endswith(".attr.json"):
            if json.loads(path.read_text()).get("file_id") == file_id:
                found.append(path)
        elif file_id in path.name:
            found.append(path)
    return found


async def sha256_of_download(
    http: httpx.AsyncClient, se: StorageElementProcess, file_id: str, token: str
) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    async with http.stream(
        "GET", f"{se.url}/api/v1/files/{file_id}/download", headers=auth(token)
    ) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_bytes():
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


async def test_finalize_moves_the_file_to_rw_and_deletes_the_source_after_the_delay(
    stack: Stack, finalizer: ManagedProcess, token: TokenFactory
) -> None:
    url = finalizer.url
    with trio.fail_after(60):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            result, body = await upload_temporary(http, url, token(), 3 * MIB + 17)
            file_id = result["file_id"]
            assert files_of(stack.se_edit, file_id)

            started = await http.post(f"{url}/api/v1/finalize/{file_id}", headers=auth(token()))
            assert started.status_code == 202, started.text
            accepted = started.json()
            tx_id = accepted["transaction_id"]
            assert accepted["status"] in {"pending", "copying", "committed", "done"}
            assert accepted["file_id"] == file_id
            assert started.headers["Location"] == f"/api/v1/finalize/{tx_id}/status"

            # Being finalized (or just finalized): a second request is refused.
            again = await http.post(f"{url}/api/v1/finalize/{file_id}", headers=auth(token()))
            assert again.status_code == 409, again.text
            assert again.json()["error"]["code"] == "FINALIZATION_IN_PROGRESS"

            committed = await wait_status(http, url, token(), tx_id, {"committed", "done"})
            assert committed["storage_element_id"] == "se-rw"
            assert committed["storage_element_url"] == stack.se_rw.url
            assert committed["checksum"] == body.sha256
            # The new location serves the same bytes, with the same name and metadata.
            assert await sha256_of_download(http, stack.se_rw, file_id, token()) == (
                body.sha256,
                body.size,
            )
            meta = (
                await http.get(f"{stack.se_rw.url}/api/v1/files/{file_id}", headers=auth(token()))
            ).json()
            assert meta["original_filename"] == "report final.bin"
            assert meta["description"] == "quarterly report"
            assert meta["metadata"]["project"] == "apollo"
            assert meta["metadata"]["n"] == 3
            assert meta["retention_policy"] == "permanent"

            done = await wait_status(http, url, token(), tx_id, {"done", "rolled_back"})
            assert done["status"] == "done", done
            assert done["source_deleted"] is True
            assert [h["state"] for h in done["history"]] == [
                "pending",
                "copying",
                "committed",
                "done",
            ]
            # The source went after the delay; the rw copy stays.
            assert files_of(stack.se_edit, file_id) == []
            gone = await http.get(
                f"{stack.se_edit.url}/api/v1/files/{file_id}", headers=auth(token())
            )
            assert gone.status_code == 404
            assert len(files_of(stack.se_rw, file_id)) == 2

            # Finalized: a third request is still refused.
            third = await http.post(f"{url}/api/v1/finalize/{file_id}", headers=auth(token()))
            assert third.status_code == 409
            # Another ingester (the file lock is per process without Redis) finds it permanent.
            other = await http.post(f"{stack.url}/api/v1/finalize/{file_id}", headers=auth(token()))
            assert other.status_code == 409
            assert other.json()["error"]["code"] == "ALREADY_PERMANENT"

            text = (await http.get(f"{url}/metrics")).text
            assert metric(text, 'ingester_finalizations_total{outcome="done"}') >= 1
            assert metric(text, "ingester_finalizations_in_flight") == 0


async def test_unknown_files_and_other_users(
    stack: Stack, finalizer: ManagedProcess, token: TokenFactory
) -> None:
    url = finalizer.url
    with trio.fail_after(60):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            unknown = await http.post(
                f"{url}/api/v1/finalize/{uuid.uuid4()}", headers=auth(token())
            )
            assert unknown.status_code == 404
            assert unknown.json()["error"]["code"] == "FILE_NOT_FOUND"
            malformed = await http.post(f"{url}/api/v1/finalize/not-a-uuid", headers=auth(token()))
            assert malformed.status_code == 400
            no_token = await http.post(f"{url}/api/v1/finalize/{uuid.uuid4()}")
            assert no_token.status_code == 401
            readonly = await http.post(
                f"{url}/api/v1/finalize/{uuid.uuid4()}", headers=auth(token(role="readonly"))
            )
            assert readonly.status_code == 403

            result, body = await upload_temporary(http, url, token(), 200_000, seed=9)
            file_id = result["file_id"]
            # Someone else's file is as unknown as a missing one; nothing moves.
            bob = await http.post(
                f"{url}/api/v1/finalize/{file_id}", headers=auth(token(sub="bob"))
            )
            assert bob.status_code == 404
            assert files_of(stack.se_rw, file_id) == []

            # An admin may finalize anyone's file; the uploader sees the transaction, others not.
            started = await http.post(
                f"{url}/api/v1/finalize/{file_id}", headers=auth(token(sub="root", role="admin"))
            )
            assert started.status_code == 202, started.text
            tx_id = started.json()["transaction_id"]
            seen_by_bob = await http.get(
                f"{url}/api/v1/finalize/{tx_id}/status", headers=auth(token(sub="bob"))
            )
            assert seen_by_bob.status_code == 404
            assert seen_by_bob.json()["error"]["code"] == "TRANSACTION_NOT_FOUND"
            done = await wait_status(http, url, token(), tx_id, {"done", "rolled_back"})
            assert done["status"] == "done"
            assert await sha256_of_download(http, stack.se_rw, file_id, token()) == (
                body.sha256,
                body.size,
            )
            unknown_tx = await http.get(
                f"{url}/api/v1/finalize/{uuid.uuid4()}/status", headers=auth(token())
            )
            assert unknown_tx.status_code == 404

            # The list is for admins.
            listed_by_user = await http.get(f"{url}/api/v1/finalize", headers=auth(token()))
            assert listed_by_user.status_code == 403
            listed = await http.get(
                f"{url}/api/v1/finalize?state=done", headers=auth(token(role="admin"))
            )
            assert listed.status_code == 200
            items = listed.json()["transactions"]
            assert tx_id in {item["transaction_id"] for item in items}
            assert {item["status"] for item in items} == {"done"}
            bad_state = await http.get(
                f"{url}/api/v1/finalize?state=nope", headers=auth(token(role="admin"))
            )
            assert bad_state.status_code == 400


async def test_concurrent_finalize_of_one_file_one_wins(
    stack: Stack, finalizer: ManagedProcess, token: TokenFactory
) -> None:
    url = finalizer.url
    with trio.fail_after(60):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            result, body = await upload_temporary(http, url, token(), 1 * MIB, seed=11)
            file_id = result["file_id"]
            answers: list[httpx.Response] = []

            async def finalize() -> None:
                answers.append(
                    await http.post(f"{url}/api/v1/finalize/{file_id}", headers=auth(token()))
                )

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(finalize)
            assert sorted(a.status_code for a in answers) == [202, 409, 409, 409]
            winner = next(a for a in answers if a.status_code == 202).json()
            done = await wait_status(
                http, url, token(), winner["transaction_id"], {"done", "rolled_back"}
            )
            assert done["status"] == "done"
            assert await sha256_of_download(http, stack.se_rw, file_id, token()) == (
                body.sha256,
                body.size,
            )
            assert len(files_of(stack.se_rw, file_id)) == 2
            assert files_of(stack.se_edit, file_id) == []


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
async def test_one_gibibyte_finalization_with_flat_memory(
    stack: Stack, token: TokenFactory
) -> None:
    """1 GiB uploaded through one ingester, finalized by a fresh one whose peak RSS stays flat."""
    size = 1024 * MIB
    mover = await trio.to_thread.run_sync(
        lambda: stack.start_ingester("mover", INGESTER_FINALIZE_SOURCE_DELETE_DELAY_S="0")
    )
    try:
        with trio.fail_after(300):
            async with httpx.AsyncClient(trust_env=False, timeout=120) as http:
                result, body = await upload_temporary(http, stack.url, token(), size, seed=1025)
                file_id = result["file_id"]
                idle_peak = peak_rss_bytes(mover.pid)
                started = await http.post(
                    f"{mover.url}/api/v1/finalize/{file_id}", headers=auth(token())
                )
                assert started.status_code == 202, started.text
                done = await wait_status(
                    http,
                    mover.url,
                    token(),
                    started.json()["transaction_id"],
                    {"done", "rolled_back"},
                )
                assert done["status"] == "done", done
                peak = peak_rss_bytes(mover.pid)
                assert await sha256_of_download(http, stack.se_rw, file_id, token()) == (
                    body.sha256,
                    size,
                )
                assert files_of(stack.se_edit, file_id) == []
                # Free the element's disk for the rest of the suite.
                gone = await http.delete(
                    f"{stack.se_rw.url}/api/v1/gc/{file_id}", headers=auth(token())
                )
                assert gone.status_code == 200
        print(f"mover peak RSS: idle {idle_peak / MIB:.1f} MiB, after 1 GiB {peak / MIB:.1f} MiB")
        assert peak < 150 * 1000 * 1000, peak
        assert peak - idle_peak < 40 * MIB, (idle_peak, peak)
    finally:
        await trio.to_thread.run_sync(mover.terminate)
