"""The reference Storage Element as a real process (`python -m ingester storage-element`).

Rules: loopback only, a free port per element, every test body under `trio.fail_after`;
each test starts its own element(s) and the process helpers kill them whatever happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from tests.support.fixtures import KeyPair, TokenFactory
from tests.support.multipart import (
    Field,
    FilePart,
    encode_multipart,
    streaming_request,
)
from tests.support.processes import (
    LOOPBACK,
    ProcessStartError,
    StorageElementProcess,
    child_env,
    free_port,
    python_module_argv,
)

MIB: Final = 1024 * 1024
# Start-up of a Python process plus the test's own traffic, on a slow CI machine.
TEST_TIMEOUT_S: Final = 60.0
ATTR_SUFFIX: Final = ".attr.json"


# --- helpers -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def element(
    tmp_path: Path,
    keys: KeyPair,
    *,
    mode: str = "edit",
    capacity_bytes: int | None = None,
    data_dir: Path | None = None,
    element_id: str | None = None,
    port: int | None = None,
) -> AsyncIterator[tuple[StorageElementProcess, httpx.AsyncClient]]:
    async with contextlib.AsyncExitStack() as stack:
        se = await stack.enter_async_context(
            StorageElementProcess(
                tmp_path,
                mode=mode,
                public_key=keys.public_path,
                element_id=element_id,
                capacity_bytes=capacity_bytes,
                port=port,
                data_dir=data_dir,
            )
        )
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=se.url, trust_env=False, timeout=30.0)
        )
        yield se, client


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def upload_parts(
    client: httpx.AsyncClient,
    token: str,
    parts: list[Field | FilePart],
    *,
    chunked: bool = False,
    truncate: int = 0,
) -> httpx.Response:
    content_type, body = encode_multipart(parts)
    request = streaming_request(
        client,
        "POST",
        "/api/v1/files/upload",
        body[: len(body) - truncate],
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
        chunked=chunked,
    )
    return await client.send(request)


async def upload(
    client: httpx.AsyncClient,
    token: str,
    data: bytes,
    *,
    filename: str = "data.bin",
    fields: dict[str, str] | None = None,
    content_type: str = "application/octet-stream",
) -> httpx.Response:
    """Fields first, then the file (as browsers and httpx send them)."""
    parts: list[Field | FilePart] = [Field(name, value) for name, value in (fields or {}).items()]
    parts.append(FilePart(data, filename=filename, content_type=content_type))
    return await upload_parts(client, token, parts)


def _names(directory: Path) -> list[str]:
    # Dot files are the element's own (.tmp, .lock).
    return sorted(entry.name for entry in directory.iterdir() if not entry.name.startswith("."))


async def stored_names(se: StorageElementProcess) -> list[str]:
    return await trio.to_thread.run_sync(_names, se.data_dir)


async def temp_names(se: StorageElementProcess) -> list[str]:
    return await trio.to_thread.run_sync(_names, se.tmp_dir)


async def read_bytes(path: Path) -> bytes:
    return await trio.to_thread.run_sync(path.read_bytes)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    with trio.move_on_after(timeout_s):
        while True:
            if await check():
                return
            await trio.sleep(0.02)
    raise AssertionError(f"not within {timeout_s:g} s: {what}")


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


async def info(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/api/v1/info")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def open_partial_upload(
    se: StorageElementProcess, token: str, body: bytes, content_type: str, send: int
) -> trio.SocketStream:
    """A raw connection that declares all of `body` and sends only its first `send` bytes."""
    stream = await trio.open_tcp_stream(LOOPBACK, se.port)
    head = (
        "POST /api/v1/files/upload HTTP/1.1\r\n"
        f"Host: {LOOPBACK}:{se.port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    await stream.send_all(head + body[:send])
    return stream


async def wait_for_temp_of(se: StorageElementProcess, min_size: int) -> None:
    def big_enough() -> bool:
        return any(path.stat().st_size >= min_size for path in se.tmp_dir.iterdir())

    async def check() -> bool:
        return await trio.to_thread.run_sync(big_enough)

    await eventually(check, 10.0, f"a temp file of {min_size}+ bytes in {se.tmp_dir}")


# --- uploads and downloads -----------------------------------------------------------------------


async def test_upload_download_roundtrip(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory(sub="alice-id", name="alice")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (se, client):
            for size in (0, 1, 3 * MIB + 7):
                data = os.urandom(size)
                response = await upload(
                    client, token, data, filename=f"файл {size}.bin", content_type="x/test"
                )
                assert response.status_code == 201, response.text
                created = response.json()
                file_id = created["file_id"]
                assert uuid.UUID(file_id).version == 4
                assert created["checksum"] == sha256(data)
                assert created["file_size"] == size
                assert created["original_filename"] == f"файл {size}.bin"
                assert created["storage_filename"].endswith(f"_{file_id}.bin")
                assert created["message"]

                async with client.stream(
                    "GET",
                    f"/api/v1/files/{file_id}/download",
                    headers={"Authorization": f"Bearer {token}"},
                ) as download:
                    assert download.status_code == 200
                    assert download.headers["content-length"] == str(size)
                    assert download.headers["content-type"] == "application/octet-stream"
                    assert download.headers["etag"] == f'"{sha256(data)}"'
                    disposition = download.headers["content-disposition"]
                    assert disposition.startswith("attachment;")
                    assert "filename*=UTF-8''%D1%84%D0%B0%D0%B9%D0%BB%20" in disposition
                    received = b"".join([chunk async for chunk in download.aiter_bytes()])
                assert sha256(received) == sha256(data)
                head = await client.head(
                    f"/api/v1/files/{file_id}/download",
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert head.status_code == 200
                assert head.headers["content-length"] == str(size)
                assert head.content == b""

                meta = await client.get(
                    f"/api/v1/files/{file_id}", headers={"Authorization": f"Bearer {token}"}
                )
                assert meta.status_code == 200
                record = meta.json()
                assert record["checksum"] == sha256(data)
                assert record["file_size"] == size
                assert record["content_type"] == "x/test"
                assert record["created_by_id"] == "alice-id"
                assert record["created_by_username"] == "alice"

                # On disk: the bytes under the storage name, the record beside them.
                name = created["storage_filename"]
                assert await read_bytes(se.data_dir / name) == data
                attr = json.loads(await read_bytes(se.data_dir / (name + ATTR_SUFFIX)))
                assert attr == record
                assert set(attr) >= {
                    "file_id",
                    "original_filename",
                    "storage_filename",
                    "file_size",
                    "content_type",
                    "created_at",
                    "created_by_id",
                    "created_by_username",
                    "description",
                    "checksum",
                    "metadata",
                    "version",
                    "retention_policy",
                }
                assert attr["created_at"].endswith("+00:00")
            assert await temp_names(se) == []
            assert len(await stored_names(se)) == 6


async def test_fields_before_and_after_the_file(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    data = os.urandom(200_000)
    fields: list[Field | FilePart] = [
        Field("description", "quarterly report"),
        Field("version", "2.1"),
        Field("retention_policy", "permanent"),
        Field("metadata", '{"project": "x", "n": [1, 2]}'),
        Field("content_type", "application/pdf"),
        Field("unknown_field", "ignored"),
    ]
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (_se, client):
            for order in ("before", "after"):
                file_id = str(uuid.uuid4())
                file_part = FilePart(data, filename="report.pdf", content_type="text/plain")
                with_id: list[Field | FilePart] = [*fields, Field("file_id", file_id.upper())]
                parts = [*with_id, file_part] if order == "before" else [file_part, *with_id]
                response = await upload_parts(client, token, parts)
                assert response.status_code == 201, response.text
                assert response.json()["file_id"] == file_id
                assert response.json()["checksum"] == sha256(data)
                record = (
                    await client.get(
                        f"/api/v1/files/{file_id}", headers={"Authorization": f"Bearer {token}"}
                    )
                ).json()
                assert record["description"] == "quarterly report"
                assert record["version"] == "2.1"
                assert record["retention_policy"] == "permanent"
                assert record["metadata"] == {"project": "x", "n": [1, 2]}
                assert record["content_type"] == "application/pdf"
                assert record["original_filename"] == "report.pdf"

            # The part's own Content-Type is used when no content_type field overrides it.
            plain = await upload_parts(
                client, token, [FilePart(b"hello", filename="a.txt", content_type="text/plain")]
            )
            assert plain.status_code == 201
            record = (
                await client.get(
                    f"/api/v1/files/{plain.json()['file_id']}",
                    headers={"Authorization": f"Bearer {token}"},
                )
            ).json()
            assert record["content_type"] == "text/plain"
            assert record["metadata"] == {}
            assert record["description"] is None


async def test_malformed_uploads(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    auth = {"Authorization": f"Bearer {token}"}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (se, client):
            no_file = await upload_parts(client, token, [Field("description", "x")])
            assert (no_file.status_code, error_code(no_file)) == (400, "MISSING_FILE")

            bad_id = await upload(client, token, b"x", fields={"file_id": "not-a-uuid"})
            assert (bad_id.status_code, error_code(bad_id)) == (400, "INVALID_FIELD")

            bad_meta = await upload(client, token, b"x", fields={"metadata": "[1, 2]"})
            assert (bad_meta.status_code, error_code(bad_meta)) == (400, "INVALID_METADATA")

            two_files = await upload_parts(client, token, [FilePart(b"a"), FilePart(b"b")])
            assert (two_files.status_code, error_code(two_files)) == (400, "INVALID_FIELD")

            truncated = await upload_parts(
                client, token, [FilePart(os.urandom(100_000))], truncate=50
            )
            assert (truncated.status_code, error_code(truncated)) == (400, "MALFORMED_MULTIPART")

            not_form = await client.post(
                "/api/v1/files/upload", headers={**auth, "Content-Type": "text/plain"}, content=b"x"
            )
            assert not_form.status_code == 415

            assert await stored_names(se) == []
            assert await temp_names(se) == []
            assert (await info(client))["reserved_bytes"] == 0


async def test_download_streams_a_large_file(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    data = os.urandom(24 * MIB + 3)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (_se, client):
            response = await upload(client, token, data)
            assert response.status_code == 201
            file_id = response.json()["file_id"]
            hasher = hashlib.sha256()
            chunks = 0
            async with client.stream(
                "GET",
                f"/api/v1/files/{file_id}/download",
                headers={"Authorization": f"Bearer {token}"},
            ) as download:
                assert download.status_code == 200
                assert download.headers["content-length"] == str(len(data))
                assert "transfer-encoding" not in download.headers
                async for chunk in download.aiter_raw():
                    hasher.update(chunk)
                    chunks += 1
            assert hasher.hexdigest() == sha256(data)
            # Delivered as a stream of reads, not one buffer.
            assert chunks > 1


async def test_many_concurrent_uploads(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    payloads = [os.urandom(512 * 1024 + i) for i in range(12)]
    results: dict[int, httpx.Response] = {}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (se, client):

            async def one(index: int) -> None:
                results[index] = await upload(client, token, payloads[index])

            async with trio.open_nursery() as nursery:
                for index in range(len(payloads)):
                    nursery.start_soon(one, index)
            for index, data in enumerate(payloads):
                assert results[index].status_code == 201
                assert results[index].json()["checksum"] == sha256(data)
            summary = await info(client)
            assert summary["file_count"] == len(payloads)
            assert summary["used_bytes"] == sum(map(len, payloads))
            assert summary["reserved_bytes"] == 0
            # A removal that finds nothing is final here (the ingester's saga relies on it).
            assert summary["capabilities"]["stores_after_hangup"] is False
            assert await temp_names(se) == []


# --- authentication and authorization ------------------------------------------------------------


async def test_tokens_and_roles(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    writer = token_factory(role="user")
    reader = token_factory(role="readonly")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (_se, client):
            created = await upload(client, writer, b"payload")
            assert created.status_code == 201
            file_id = created.json()["file_id"]

            protected = [
                ("POST", "/api/v1/files/upload"),
                ("GET", f"/api/v1/files/{file_id}"),
                ("GET", f"/api/v1/files/{file_id}/download"),
                ("DELETE", f"/api/v1/files/{file_id}"),
                ("DELETE", f"/api/v1/gc/{file_id}"),
                ("GET", f"/api/v1/gc/{file_id}/exists"),
            ]
            refresh = token_factory(token_type="refresh")
            for method, path in protected:
                for headers in (
                    {},
                    {"Authorization": "Bearer not.a.token"},
                    {"Authorization": f"Bearer {refresh}"},
                    {"Authorization": f"Basic {writer}"},
                ):
                    response = await client.request(method, path, headers=headers)
                    assert response.status_code == 401, (method, path, headers, response.text)
                    assert response.headers["www-authenticate"].startswith("Bearer")
                    assert error_code(response) == "UNAUTHORIZED"

            # readonly reads, but does not write.
            reader_auth = {"Authorization": f"Bearer {reader}"}
            forbidden = await upload(client, reader, b"x")
            assert (forbidden.status_code, error_code(forbidden)) == (403, "FORBIDDEN")
            for method, path in protected[3:5]:
                response = await client.request(method, path, headers=reader_auth)
                assert response.status_code == 403
            for path in (f"/api/v1/files/{file_id}", f"/api/v1/gc/{file_id}/exists"):
                assert (await client.get(path, headers=reader_auth)).status_code == 200
            download = await client.get(f"/api/v1/files/{file_id}/download", headers=reader_auth)
            assert download.content == b"payload"

            # A Keycloak token with the upload scope writes.
            keycloak = token_factory.keycloak(scope="openid files:write")
            assert (await upload(client, keycloak, b"kc")).status_code == 201

            for path in ("/health/live", "/health/ready", "/api/v1/info", "/api/v1/capacity"):
                assert (await client.get(path)).status_code == 200


# --- modes ---------------------------------------------------------------------------------------


async def test_modes(tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory) -> None:
    token = token_factory()
    auth = {"Authorization": f"Bearer {token}"}
    data_dir = tmp_path / "shared-data"
    with trio.fail_after(TEST_TIMEOUT_S * 2):
        # Files written by an edit element, then served by the same directory in each mode.
        async with element(tmp_path, keypair, mode="edit", data_dir=data_dir) as (_se, client):
            ids = []
            for index in range(4):
                response = await upload(client, token, f"file {index}".encode())
                assert response.status_code == 201
                ids.append(response.json()["file_id"])

        async with element(tmp_path, keypair, mode="rw", data_dir=data_dir) as (se, client):
            assert (await upload(client, token, b"rw ok")).status_code == 201
            refused = await client.delete(f"/api/v1/files/{ids[0]}", headers=auth)
            assert (refused.status_code, error_code(refused)) == (400, "DELETE_NOT_ALLOWED")
            assert (await client.get(f"/api/v1/files/{ids[0]}", headers=auth)).status_code == 200
            gc = await client.delete(f"/api/v1/gc/{ids[0]}", headers=auth)
            assert gc.status_code == 200
            assert gc.json()["deleted"] is True

        async with element(tmp_path, keypair, mode="ro", data_dir=data_dir) as (se, client):
            refused = await upload(client, token, b"no")
            assert (refused.status_code, error_code(refused)) == (400, "READ_ONLY_MODE")
            refused = await client.delete(f"/api/v1/files/{ids[1]}", headers=auth)
            assert (refused.status_code, error_code(refused)) == (400, "DELETE_NOT_ALLOWED")
            download = await client.get(f"/api/v1/files/{ids[1]}/download", headers=auth)
            assert download.content == b"file 1"
            assert (await client.delete(f"/api/v1/gc/{ids[1]}", headers=auth)).status_code == 200
            summary = await info(client)
            assert (summary["mode"], summary["is_writable"]) == ("ro", False)

        async with element(tmp_path, keypair, mode="ar", data_dir=data_dir) as (se, client):
            refused = await upload(client, token, b"no")
            assert (refused.status_code, error_code(refused)) == (400, "READ_ONLY_MODE")
            for path in (f"/api/v1/files/{ids[2]}", f"/api/v1/files/{ids[2]}/download"):
                response = await client.get(path, headers=auth)
                assert (response.status_code, error_code(response)) == (400, "ARCHIVE_MODE")
            exists = await client.get(f"/api/v1/gc/{ids[2]}/exists", headers=auth)
            assert exists.json()["exists"] is True
            assert (await client.delete(f"/api/v1/gc/{ids[2]}", headers=auth)).status_code == 200
            summary = await info(client)
            assert summary["mode"] == "ar"
            assert summary["file_count"] == 2  # ids[3] and the rw upload

        async with element(tmp_path, keypair, mode="edit", data_dir=data_dir) as (se, client):
            deleted = await client.delete(f"/api/v1/files/{ids[3]}", headers=auth)
            assert deleted.status_code == 204
            gone = await client.get(f"/api/v1/files/{ids[3]}", headers=auth)
            assert (gone.status_code, error_code(gone)) == (404, "FILE_NOT_FOUND")
            again = await client.delete(f"/api/v1/files/{ids[3]}", headers=auth)
            assert again.status_code == 404
            assert all(ids[3] not in name for name in await stored_names(se))
            assert (await info(client))["file_count"] == 1


# --- capacity ------------------------------------------------------------------------------------


async def test_capacity_declared_size_refused_up_front(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair, capacity_bytes=MIB) as (se, client):
            full = await upload(client, token, os.urandom(2 * MIB))
            assert (full.status_code, error_code(full)) == (507, "INSUFFICIENT_STORAGE")
            assert await stored_names(se) == []
            assert await temp_names(se) == []

            fits = os.urandom(300_000)
            assert (await upload(client, token, fits)).status_code == 201
            summary = await info(client)
            assert summary["capacity_bytes"] == MIB
            assert summary["used_bytes"] == len(fits)
            assert summary["free_bytes"] == MIB - len(fits)
            assert summary["reserved_bytes"] == 0
            capacity = (await client.get("/api/v1/capacity")).json()
            assert capacity["capacity_bytes"] == MIB
            assert capacity["used_bytes"] == len(fits)
            assert capacity["free_bytes"] == MIB - len(fits)
            assert capacity["capacity"]["available"] == MIB - len(fits)


async def test_capacity_counted_while_streaming(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair, capacity_bytes=MIB) as (se, client):
            response = await upload_parts(
                client, token, [FilePart(os.urandom(3 * MIB))], chunked=True
            )
            assert response.request.headers.get("transfer-encoding") == "chunked"
            assert "content-length" not in response.request.headers
            assert (response.status_code, error_code(response)) == (507, "INSUFFICIENT_STORAGE")
            assert await stored_names(se) == []
            assert await temp_names(se) == []
            summary = await info(client)
            assert (summary["used_bytes"], summary["reserved_bytes"]) == (0, 0)

            # Under the limit, a chunked upload is stored as any other.
            data = os.urandom(MIB // 2)
            ok = await upload_parts(client, token, [FilePart(data)], chunked=True)
            assert ok.status_code == 201
            assert ok.json()["checksum"] == sha256(data)


async def test_concurrent_uploads_cannot_overshoot_capacity(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    statuses: list[int] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair, capacity_bytes=3 * MIB // 2) as (se, client):

            async def one() -> None:
                statuses.append((await upload(client, token, os.urandom(MIB))).status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
                nursery.start_soon(one)
            assert sorted(statuses) == [201, 507]
            summary = await info(client)
            assert (summary["used_bytes"], summary["reserved_bytes"]) == (MIB, 0)
            assert await temp_names(se) == []


# --- ids, gc -------------------------------------------------------------------------------------


async def test_duplicate_file_id_conflicts(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    file_id = str(uuid.uuid4())
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (se, client):
            first = await upload(client, token, b"first", fields={"file_id": file_id})
            assert first.status_code == 201
            assert first.json()["file_id"] == file_id
            before = await upload(client, token, b"second", fields={"file_id": file_id})
            assert (before.status_code, error_code(before)) == (409, "FILE_EXISTS")
            after = await upload_parts(
                client, token, [FilePart(os.urandom(MIB)), Field("file_id", file_id)]
            )
            assert (after.status_code, error_code(after)) == (409, "FILE_EXISTS")
            assert len(await stored_names(se)) == 2
            assert await temp_names(se) == []
            download = await client.get(
                f"/api/v1/files/{file_id}/download", headers={"Authorization": f"Bearer {token}"}
            )
            assert download.content == b"first"


async def test_gc_delete_and_exists(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    auth = {"Authorization": f"Bearer {token}"}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair, mode="rw") as (se, client):
            file_id = (await upload(client, token, b"compensate me")).json()["file_id"]
            exists = await client.get(f"/api/v1/gc/{file_id}/exists", headers=auth)
            assert exists.json()["exists"] is True

            deleted = await client.delete(f"/api/v1/gc/{file_id}", headers=auth)
            assert deleted.status_code == 200
            assert deleted.json()["file_id"] == file_id
            assert deleted.json()["deleted"] is True
            exists = await client.get(f"/api/v1/gc/{file_id}/exists", headers=auth)
            assert exists.json()["exists"] is False
            assert await stored_names(se) == []

            again = await client.delete(f"/api/v1/gc/{file_id}", headers=auth)
            assert (again.status_code, error_code(again)) == (404, "FILE_NOT_FOUND")
            unknown = str(uuid.uuid4())
            assert (await client.delete(f"/api/v1/gc/{unknown}", headers=auth)).status_code == 404
            exists = await client.get(f"/api/v1/gc/{unknown}/exists", headers=auth)
            assert exists.json()["exists"] is False
            assert (await info(client))["used_bytes"] == 0


async def test_gc_of_an_upload_in_flight_aborts_it(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    file_id = str(uuid.uuid4())
    content_type, body = encode_multipart(
        [Field("file_id", file_id), FilePart(os.urandom(4 * MIB))]
    )
    gate = trio.Event()

    class GatedBody(httpx.AsyncByteStream):
        """Half the body, then the rest once the gate opens."""

        def __init__(self) -> None:
            self.parts = [body[: 2 * MIB], body[2 * MIB :]]

        def __aiter__(self) -> GatedBody:
            return self

        async def __anext__(self) -> bytes:
            if not self.parts:
                raise StopAsyncIteration
            if len(self.parts) == 1:
                await gate.wait()
            return self.parts.pop(0)

    responses: list[httpx.Response] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (se, client):

            async def send() -> None:
                request = client.build_request(
                    "POST",
                    "/api/v1/files/upload",
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": content_type,
                        "Content-Length": str(len(body)),
                    },
                )
                request.stream = GatedBody()
                responses.append(await client.send(request))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await wait_for_temp_of(se, MIB)
                gc = await client.delete(
                    f"/api/v1/gc/{file_id}", headers={"Authorization": f"Bearer {token}"}
                )
                assert gc.status_code == 200
                assert gc.json()["status"] == "aborted"
                gate.set()
            assert (responses[0].status_code, error_code(responses[0])) == (409, "UPLOAD_ABORTED")
            assert await stored_names(se) == []
            assert await temp_names(se) == []
            assert (await info(client))["reserved_bytes"] == 0


# --- failures: disconnects, crashes, signals ------------------------------------------------------


async def test_client_disconnect_mid_upload_leaves_no_temp(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    content_type, body = encode_multipart([FilePart(os.urandom(8 * MIB))])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair, capacity_bytes=64 * MIB) as (se, client):
            stream = await open_partial_upload(se, token, body, content_type, send=len(body) // 2)
            await wait_for_temp_of(se, MIB)
            assert (await info(client))["reserved_bytes"] == len(body)
            await stream.aclose()

            async def clean() -> bool:
                return await temp_names(se) == []

            await eventually(clean, 2.0, "the temp file of the abandoned upload is removed")
            summary = await info(client)
            assert (summary["file_count"], summary["reserved_bytes"]) == (0, 0)
            assert await stored_names(se) == []
            # Still serving.
            assert (await upload(client, token, b"after")).status_code == 201


async def test_restart_after_sigkill_mid_upload(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    token = token_factory()
    auth = {"Authorization": f"Bearer {token}"}
    data_dir = tmp_path / "data"
    kept = os.urandom(MIB + 11)
    content_type, body = encode_multipart([FilePart(os.urandom(6 * MIB))])
    orphan = f"orphan_{uuid.uuid4()}.bin"
    with trio.fail_after(TEST_TIMEOUT_S * 2):
        async with element(tmp_path, keypair, data_dir=data_dir) as (se, client):
            created = await upload(client, token, kept, fields={"description": "survivor"})
            assert created.status_code == 201
            file_id = created.json()["file_id"]
            stream = await open_partial_upload(se, token, body, content_type, send=3 * MIB)
            await wait_for_temp_of(se, MIB)
            assert se.kill() == -signal.SIGKILL
            await stream.aclose()
            assert len(await temp_names(se)) == 1  # the partial upload, left by the crash

        # A crash between the two renames of a commit leaves a data file without its record.
        await trio.to_thread.run_sync((data_dir / orphan).write_bytes, b"half committed")
        await trio.to_thread.run_sync((data_dir / "NOTES.txt").write_bytes, b"an operator's")

        async with element(tmp_path, keypair, data_dir=data_dir) as (se, client):
            assert await temp_names(se) == []
            names = await stored_names(se)
            assert orphan not in names
            assert "NOTES.txt" in names  # not ours: left alone
            record = (await client.get(f"/api/v1/files/{file_id}", headers=auth)).json()
            assert record["description"] == "survivor"
            assert record["checksum"] == sha256(kept)
            download = await client.get(f"/api/v1/files/{file_id}/download", headers=auth)
            assert sha256(download.content) == sha256(kept)
            summary = await info(client)
            assert (summary["file_count"], summary["used_bytes"]) == (1, len(kept))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signals_stop_cleanly(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory, signum: int
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (se, client):
            assert (await upload(client, token_factory(), b"x")).status_code == 201
            se.send_signal(signum)
            with trio.fail_after(10):
                assert await se.exited() == 0
            assert "Traceback" not in se.log_tail(200)


async def test_readiness_follows_the_data_directory(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (se, client):
            assert (await client.get("/health/ready")).status_code == 200
            await trio.to_thread.run_sync(se.tmp_dir.rmdir)
            not_ready = await client.get("/health/ready")
            assert not_ready.status_code == 503
            assert (await client.get("/health/live")).json() == {"status": "ok"}
            await trio.to_thread.run_sync(se.tmp_dir.mkdir)
            assert (await client.get("/health/ready")).status_code == 200


async def test_a_data_directory_serves_one_element_at_a_time(
    tmp_path: Path, keypair: KeyPair
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with element(tmp_path, keypair) as (se, client):
            argv = python_module_argv(
                "ingester",
                "storage-element",
                "--mode",
                "rw",
                "--port",
                str(free_port()),
                "--data-dir",
                str(se.data_dir),
                "--public-key",
                str(keypair.public_path),
            )
            second = await trio.run_process(
                argv, env=child_env(), capture_stdout=True, capture_stderr=True, check=False
            )
            assert second.returncode == 2
            assert b"another storage element is using this directory" in second.stderr
            assert (await client.get("/health/ready")).status_code == 200


async def test_start_up_failure_reports_exit_status_and_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_key = tmp_path / "bad.pem"
    await trio.to_thread.run_sync(bad_key.write_text, "not a key")

    with trio.fail_after(TEST_TIMEOUT_S), pytest.raises(ProcessStartError) as failure:
        async with StorageElementProcess(tmp_path, mode="edit", public_key=bad_key):
            pass
    assert "exited with status 2" in str(failure.value)
    assert "cannot use the public key" in str(failure.value)  # the log's tail
    assert "cannot use the public key" in capsys.readouterr().err


async def test_a_paused_element_resumes(
    tmp_path: Path, keypair: KeyPair, token_factory: TokenFactory
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        se = StorageElementProcess(tmp_path, mode="edit", public_key=keypair.public_path)
        async with (
            se,
            httpx.AsyncClient(base_url=se.url, trust_env=False, timeout=30) as client,
        ):
            se.stop_signal()
            with trio.move_on_after(0.5) as paused:
                await client.get("/health/live")
            assert paused.cancelled_caught
            se.cont_signal()
            assert (await client.get("/health/live")).status_code == 200
            assert (await upload(client, token_factory(), b"after")).status_code == 201
        # Leaving the context kills it.
        assert se.returncode == -signal.SIGKILL
