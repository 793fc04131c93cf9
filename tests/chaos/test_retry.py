"""Retries of safe failures, with real processes: a reference Storage Element behind a small
front of the test's that answers `503` to the first uploads (as an overloaded element does)
and passes everything else through."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import TokenFactory
from tests.support.client import MultipartUpload, auth, post_upload, random_chunks
from tests.support.fixtures import KeyPair
from tests.support.http_server import Request, Response, serve_http
from tests.support.processes import (
    ManagedProcess,
    StorageElementProcess,
    start_ingester,
    start_storage_element,
)

UPLOAD_PATH = "/api/v1/files/upload"


@pytest.fixture
def element(tmp_path: Path, keypair: KeyPair) -> Iterator[StorageElementProcess]:
    se = start_storage_element(
        tmp_path, element_id="se-a", mode="edit", public_key=keypair.public_path
    )
    try:
        yield se
    finally:
        se.terminate()


class OverloadedFront:
    """Answers `503` to the next `refuse` uploads, then forwards everything to the element."""

    def __init__(self, upstream: str, http: httpx.AsyncClient) -> None:
        self.upstream = upstream
        self.http = http
        self.refuse = 0
        self.refused = 0
        self.forwarded_uploads = 0

    async def handle(self, request: Request) -> Response:
        if request.method == "POST" and request.path == UPLOAD_PATH:
            if self.refuse > 0:
                self.refuse -= 1
                self.refused += 1
                return Response.json({"detail": "overloaded, try again"}, 503)
            self.forwarded_uploads += 1
        headers = {k: v for k, v in request.headers.items() if k not in ("host", "content-length")}
        headers.pop("transfer-encoding", None)
        upstream = await self.http.request(
            request.method, self.upstream + request.target, headers=headers, content=request.body
        )
        kept = [(k, v) for k, v in upstream.headers.items() if k.lower() == "content-type"]
        return Response(upstream.status_code, upstream.content, kept)


@contextlib.asynccontextmanager
async def ingester(
    tmp_path: Path, keypair: KeyPair, front_url: str, **env: str
) -> AsyncIterator[str]:
    def run() -> ManagedProcess:
        proc = start_ingester(
            tmp_path,
            name="ingester",
            public_key=keypair.public_path,
            elements=[{"id": "se-a", "api_url": front_url, "mode": "edit"}],
            env={"INGESTER_SE_PROBE_INTERVAL_S": "0.2", **env},
        )
        try:
            proc.wait_ready()
        except BaseException:
            proc.terminate()
            raise
        return proc

    proc = await trio.to_thread.run_sync(run)
    try:
        yield proc.url
    finally:
        proc.terminate()


async def test_an_overloaded_element_is_retried_after_a_backoff(
    tmp_path: Path, keypair: KeyPair, element: StorageElementProcess, token_factory: TokenFactory
) -> None:
    token = token_factory()
    with trio.fail_after(60):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            front = OverloadedFront(element.url, http)
            async with (
                serve_http(front.handle) as server,
                ingester(
                    tmp_path,
                    keypair,
                    server.url,
                    INGESTER_RETRY_MAX_ATTEMPTS="4",
                    INGESTER_RETRY_BASE_S="0.1",
                ) as url,
            ):
                await exercise(http, url, front, element, token)


async def exercise(
    http: httpx.AsyncClient,
    url: str,
    front: OverloadedFront,
    element: StorageElementProcess,
    token: str,
) -> None:
    front.refuse = 2
    body = MultipartUpload(list(random_chunks(200_000)))
    response = await post_upload(http, url, token, body)
    assert response.status_code == 201, response.text
    assert front.refused == 2
    assert front.forwarded_uploads == 1
    file_id = response.json()["file_id"]
    stored = await http.get(f"{element.url}/api/v1/files/{file_id}/download", headers=auth(token))
    assert hashlib.sha256(stored.content).hexdigest() == body.sha256
    # One file: the refused attempts left nothing.
    names = sorted(p.name for p in element.stored_files() if p.name != ".lock")
    assert len(names) == 2, names  # the file and its attr.json
    metrics = (await http.get(url + "/metrics")).text
    assert 'ingester_retries_total{element_id="se-a"} 2.0' in metrics

    # Past the attempts allowed: a clear 503 with Retry-After, nothing stored.
    front.refuse = 10
    response = await post_upload(http, url, token, MultipartUpload([b"n" * 1000]))
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "NO_STORAGE_AVAILABLE"
    assert "Retry-After" in response.headers
    assert front.refused == 2 + 4
    names = sorted(p.name for p in element.stored_files() if p.name != ".lock")
    assert len(names) == 2, names
