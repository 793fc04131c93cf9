"""Storage Elements that misbehave under an upload: the client gets one clear answer within
the configured timeouts, and nothing is left behind once the element recovers."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import trio

from tests.conftest import TokenFactory
from tests.support.chaos import serve_ingester
from tests.support.client import MIB, MultipartUpload, post_upload, random_chunks
from tests.support.fixtures import KeyPair
from tests.support.http_server import Request, Response, serve_http
from tests.support.processes import StorageElementProcess
from tests.support.waiting import eventually


async def edit_element(
    stack: contextlib.AsyncExitStack,
    tmp_path: Path,
    keypair: KeyPair,
    element_id: str,
    capacity_bytes: int | None = None,
) -> StorageElementProcess:
    """An edit element `element_id`, stopped when `stack` closes."""
    element = StorageElementProcess(
        tmp_path,
        mode="edit",
        public_key=keypair.public_path,
        element_id=element_id,
        capacity_bytes=capacity_bytes,
    )
    return await stack.enter_async_context(element)


def stored(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name != ".lock")


async def test_stalled_element_fails_the_upload_within_the_stall_timeout(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        se = await edit_element(stack, tmp_path, keypair, "se-stall")
        entry: dict[str, object] = {"id": "se-stall", "api_url": se.url, "mode": "edit"}
        ingester = await serve_ingester(
            stack,
            tmp_path,
            keypair,
            [entry],
            env={"INGESTER_SE_STALL_TIMEOUT_S": "1.5", "INGESTER_SE_PROBE_INTERVAL_S": "60"},
        )
        with trio.fail_after(40):
            async with (
                httpx.AsyncClient(trust_env=False, timeout=30) as http,
                trio.open_nursery() as nursery,
            ):
                answer: list[httpx.Response] = []

                async def upload() -> None:
                    body = MultipartUpload(
                        random_chunks(200 * MIB, seed=11),
                        fields=[("retention_policy", "temporary"), ("compress", "false")],
                    )
                    answer.append(await post_upload(http, ingester.url, token(), body))

                nursery.start_soon(upload)
                # Freeze the element once it is receiving.
                await eventually(lambda: any(se.tmp_dir.iterdir()), timeout_s=10)
                se.stop_signal()
                frozen_at = trio.current_time()
                try:
                    await eventually(lambda: bool(answer), timeout_s=15, interval_s=0.05)
                    waited = trio.current_time() - frozen_at
                finally:
                    se.cont_signal()
            response = answer[0]
            # The only element stalled: nothing left to fail over to.
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "NO_STORAGE_AVAILABLE"
            assert "se-stall" in response.json()["error"]["message"]
            assert int(response.headers["Retry-After"]) > 0
            # Stall timeout 1.5 s, plus the heartbeat's half-second tick and scheduling.
            assert waited < 6.0
            # Back from SIGSTOP, the element sees its request gone and drops the partial file.
            await eventually(lambda: not stored(se.data_dir), timeout_s=10)
            async with httpx.AsyncClient(trust_env=False) as http:
                metrics = (await http.get(ingester.url + "/metrics")).text
            assert 'ingester_uploads_total{outcome="NO_STORAGE_AVAILABLE"} 1.0' in metrics


async def test_full_elements_are_skipped_and_507_when_none_has_room(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        small = await edit_element(stack, tmp_path, keypair, "se-small", capacity_bytes=1 * MIB)
        large = await edit_element(stack, tmp_path, keypair, "se-large", capacity_bytes=8 * MIB)
        # The small element is preferred by priority: only room decides against it.
        elements: list[dict[str, object]] = [
            {"id": "se-small", "api_url": small.url, "mode": "edit", "priority": 1},
            {"id": "se-large", "api_url": large.url, "mode": "edit", "priority": 2},
        ]
        ingester = await serve_ingester(stack, tmp_path, keypair, elements)
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False) as http:
                tiny = await post_upload(
                    http, ingester.url, token(), MultipartUpload([b"t" * 1000])
                )
                fits_large = await post_upload(
                    http,
                    ingester.url,
                    token(),
                    MultipartUpload(random_chunks(3 * MIB, seed=3)),
                    stream=False,
                )
                fits_none = await post_upload(
                    http,
                    ingester.url,
                    token(),
                    MultipartUpload(random_chunks(20 * MIB, seed=4)),
                    stream=False,
                )
            assert tiny.status_code == 201, tiny.text
            assert tiny.json()["storage_element_id"] == "se-small"
            assert fits_large.status_code == 201, fits_large.text
            assert fits_large.json()["storage_element_id"] == "se-large"
            assert fits_none.status_code == 507, fits_none.text
            assert fits_none.json()["error"]["code"] == "INSUFFICIENT_STORAGE"
            # The refused upload never reached an element: only the two stored files remain.
            assert len([p for p in stored(large.data_dir) if not p.name.endswith(".json")]) == 1
            assert len([p for p in stored(small.data_dir) if not p.name.endswith(".json")]) == 1


async def test_breaker_opens_on_a_failing_element_and_uploads_go_elsewhere(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory
) -> None:
    tries: list[str] = []

    async def failing_element(request: Request) -> Response:
        if request.path == "/api/v1/files/upload":
            tries.append(request.path)
            return Response.json({"error": {"code": "BOOM", "message": "disk on fire"}}, status=500)
        if request.path.startswith("/api/v1/gc/"):
            return Response.json({"deleted": True})
        return Response.json({"status": "ok"})

    async with contextlib.AsyncExitStack() as stack:
        good = await edit_element(stack, tmp_path, keypair, "se-good")
        bad = await stack.enter_async_context(serve_http(failing_element))
        elements: list[dict[str, object]] = [
            {"id": "se-bad", "api_url": bad.url, "mode": "edit", "priority": 1},
            {"id": "se-good", "api_url": good.url, "mode": "edit", "priority": 2},
        ]
        ingester = await serve_ingester(
            stack,
            tmp_path,
            keypair,
            elements,
            env={
                "INGESTER_BREAKER_FAILURE_THRESHOLD": "2",
                "INGESTER_BREAKER_OPEN_S": "60",
                "INGESTER_SE_PROBE_INTERVAL_S": "60",
            },
        )
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False) as http:
                answers = [
                    await post_upload(http, ingester.url, token(), MultipartUpload([b"b" * 1000]))
                    for _ in range(5)
                ]
                metrics = (await http.get(ingester.url + "/metrics")).text
                ready = (await http.get(ingester.url + "/health/ready")).json()
        assert [a.status_code for a in answers] == [201] * 5
        assert {a.json()["storage_element_id"] for a in answers} == {"se-good"}
        # Two failures opened the breaker: the failing element was not tried again.
        assert len(tries) == 2
        assert 'ingester_breaker_state{element_id="se-bad"} 2.0' in metrics
        assert 'ingester_breaker_state{element_id="se-good"} 0.0' in metrics
        breaker_of = {e["id"]: e["breaker"] for e in ready["storage_elements"]}
        assert breaker_of == {"se-bad": "open", "se-good": "closed"}
