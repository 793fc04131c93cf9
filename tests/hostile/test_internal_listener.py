"""Unauthenticated detail (B10): with INGESTER_INTERNAL_PORT, metrics and readiness detail
(element ids, modes, breaker states, uploads in flight) are served only there; the public
port tells a stranger no more than `{"status"}`."""

from __future__ import annotations

import httpx
import pytest
import trio

from tests.conftest import Stack
from tests.hostile.common import Spawn, assert_unharmed, error_code
from tests.support.processes import ManagedProcess, free_port


@pytest.fixture(scope="module")
def split(spawn: Spawn) -> ManagedProcess:
    return spawn("split", INGESTER_INTERNAL_PORT=str(free_port()))


def internal_url(proc: ManagedProcess) -> str:
    return f"http://127.0.0.1:{proc.env['INGESTER_INTERNAL_PORT']}"


async def test_the_public_port_shows_no_detail_when_an_internal_port_is_set(
    stack: Stack, split: ManagedProcess
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            for path in ("/health/ready", "/api/v1/health/ready"):
                ready = await http.get(split.url + path)
                assert ready.status_code == 200, ready.text
                assert ready.json() == {"status": "ready"}
            metrics = await http.get(split.url + "/metrics")
            assert metrics.status_code == 404, metrics.text
            assert error_code(metrics) == "NOT_FOUND"
            assert (await http.get(split.url + "/health/live")).status_code == 200
        await assert_unharmed(stack, split.url, before)


async def test_the_internal_port_serves_metrics_and_readiness_detail_only(
    stack: Stack, split: ManagedProcess
) -> None:
    with trio.fail_after(30):
        internal = internal_url(split)
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            ready = await http.get(internal + "/health/ready")
            assert ready.status_code == 200, ready.text
            detail = ready.json()
            assert detail["status"] == "ready"
            assert {e["id"] for e in detail["storage_elements"]} == {"se-edit", "se-rw"}
            metrics = await http.get(internal + "/metrics")
            assert metrics.status_code == 200
            assert "ingester_uploads_in_flight" in metrics.text
            assert (await http.get(internal + "/health/live")).status_code == 200
            # Nothing else: no uploads through the back door.
            upload = await http.post(internal + "/api/v1/files/upload")
            assert upload.status_code == 404, upload.text
            assert error_code(upload) == "NOT_FOUND"


async def test_without_an_internal_port_the_public_readiness_keeps_its_detail(
    stack: Stack,
) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            ready = await http.get(stack.url + "/health/ready")
            assert ready.status_code == 200
            assert "storage_elements" in ready.json()
            assert (await http.get(stack.url + "/metrics")).status_code == 200
