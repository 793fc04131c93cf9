"""Probes, metrics, request ids, CORS and the service description, on a real ingester."""

from __future__ import annotations

import httpx
import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.support.client import MultipartUpload, post_upload
from tests.support.processes import IngesterProcess, ProcessStartError, free_port, start_ingester


async def lonely_ingester(stack: Stack, name: str) -> IngesterProcess:
    """An ingester (started, not waited for) whose only element is a port where nothing
    listens: it lives, and is never ready."""
    dead: dict[str, object] = {
        "id": "gone",
        "api_url": f"http://127.0.0.1:{free_port()}",
        "mode": "edit",
    }
    return await trio.to_thread.run_sync(
        lambda: start_ingester(
            stack.root, name=name, public_key=stack.keys.public_path, elements=[dead]
        )
    )


async def test_live_and_ready_under_both_prefixes(stack: Stack) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            for prefix in ("", "/api/v1"):
                live = await http.get(f"{stack.url}{prefix}/health/live")
                assert live.status_code == 200
                ready = await http.get(f"{stack.url}{prefix}/health/ready")
                assert ready.status_code == 200, ready.text
                body = ready.json()
                assert body["status"] == "ready"
                assert set(body["writable_storage_elements"]) == {"se-edit", "se-rw"}


async def test_ready_is_503_when_no_writable_element_answers(stack: Stack) -> None:
    with trio.fail_after(20):
        proc = await lonely_ingester(stack, "lonely")
        try:
            async with httpx.AsyncClient(trust_env=False) as http:
                ready = await http.get(proc.url + "/health/ready")
                live = await http.get(proc.url + "/health/live")
            assert live.status_code == 200
            assert ready.status_code == 503
            assert int(ready.headers["Retry-After"]) > 0
            assert "no writable Storage Element answers" in ready.json()["reasons"]
        finally:
            await trio.to_thread.run_sync(proc.terminate)


async def test_an_ingester_that_never_gets_ready_is_not_left_running(stack: Stack) -> None:
    """The test harness: `wait_ready` that gives up kills the process (one was found still
    running half an hour after the test run that started it)."""
    with trio.fail_after(30):
        proc = await lonely_ingester(stack, "never-ready")
        try:
            with pytest.raises(ProcessStartError, match="not done within"):
                await trio.to_thread.run_sync(lambda: proc.wait_ready(timeout_s=1.0))
            assert proc.returncode is not None
        finally:
            await trio.to_thread.run_sync(proc.terminate)


async def test_metrics_count_uploads_bytes_and_outcomes(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(15):
        async with httpx.AsyncClient(trust_env=False) as http:
            await post_upload(http, stack.url, token(), MultipartUpload([b"m" * 5000]))
            await post_upload(
                http, stack.url, token(), MultipartUpload([b"m"], fields=[("ttl_days", "0")])
            )
            text = (await http.get(stack.url + "/metrics")).text
        for name in (
            'ingester_uploads_total{outcome="success"}',
            'ingester_uploads_total{outcome="INVALID_FIELD"}',
            "ingester_upload_received_bytes_total",
            "ingester_upload_stored_bytes_total",
            "ingester_upload_duration_seconds_bucket",
            "ingester_uploads_in_flight",
            "ingester_compression_ratio_bucket",
            "ingester_storage_element_errors_total",
            'ingester_storage_element_up{element_id="se-edit",mode="edit"} 1.0',
            "ingester_spool_bytes 0.0",
            "ingester_memory_budget_used_bytes 0.0",
            "ingester_failovers_total",
        ):
            assert name in text, name
        stored = next(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("ingester_upload_stored_bytes_total")
        )
        assert stored >= 5000


def counter(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def test_metrics_count_tokens_checked_and_answered_from_memory(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(15):
        async with httpx.AsyncClient(trust_env=False) as http:
            before = (await http.get(stack.url + "/metrics")).text
            same = token()
            for _ in range(3):
                await post_upload(http, stack.url, same, MultipartUpload([b"t" * 100]))
            refused = await http.get(
                stack.url + "/api/v1/uploads/" + "0" * 32,
                headers={"Authorization": "Bearer " + same[:-4] + "AAAA"},
            )
            after = (await http.get(stack.url + "/metrics")).text
        assert refused.status_code == 401
        names = ("ingester_auth_token_cache_hits_total", "ingester_auth_token_checks_total")
        hits, checks = (counter(after, n) - counter(before, n) for n in names)
        # The first upload checks the token in full, the next two are answered from memory;
        # the forged one is checked in full and refused.
        assert (hits, checks) == (2, 2)


async def test_request_id_is_echoed_or_made(stack: Stack) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            echoed = await http.get(stack.url + "/health/live", headers={"X-Request-ID": "abc-123"})
            made = await http.get(stack.url + "/health/live")
            hostile = await http.get(stack.url + "/health/live", headers={"X-Request-ID": "a b\tc"})
        assert echoed.headers["X-Request-ID"] == "abc-123"
        assert len(made.headers["X-Request-ID"]) == 32
        assert hostile.headers["X-Request-ID"] != "a b\tc"


async def test_request_lines_carry_request_and_upload_ids(
    stack: Stack, token: TokenFactory
) -> None:
    import json

    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await post_upload(
                http,
                stack.url,
                token(),
                MultipartUpload([b"log me"]),
                headers={"X-Request-ID": "trace-77"},
            )
        assert response.status_code == 201
        upload_id = response.json()["upload_id"]
        await trio.sleep(0.2)
        lines = [json.loads(line) for line in stack.ingester.log_lines() if "trace-77" in line]
        assert lines, "no log line carries the request id"
        stored = [line for line in lines if line.get("event") == "upload_stored"]
        assert stored
        assert stored[0]["upload_id"] == upload_id
        assert stored[0]["user"] == "alice"
        assert stored[0]["storage_element_id"] == "se-edit"
        for line in lines:
            assert {"request_id", "upload_id", "user", "storage_element_id"} <= line.keys(), line
        access = [line for line in lines if line.get("event") == "http_request"]
        assert access[0]["storage_element_id"] == "se-edit"
        assert access[0]["upload_id"] == upload_id


async def test_unknown_route_and_method_are_json_errors(stack: Stack) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            missing = await http.get(stack.url + "/nope")
            wrong = await http.get(stack.url + "/api/v1/files/upload")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "NOT_FOUND"
        assert wrong.status_code == 405
        assert wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_cors_only_for_configured_origins(stack: Stack) -> None:
    with trio.fail_after(20):
        proc = await trio.to_thread.run_sync(
            lambda: stack.start_ingester("cors", INGESTER_CORS_ORIGINS="https://app.example")
        )
        try:
            async with httpx.AsyncClient(trust_env=False) as http:
                preflight = {
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                }
                allowed = await http.options(proc.url + "/api/v1/files/upload", headers=preflight)
                other = await http.options(
                    proc.url + "/api/v1/files/upload",
                    headers={**preflight, "Origin": "https://evil.example"},
                )
                simple = await http.get(
                    proc.url + "/health/live", headers={"Origin": "https://app.example"}
                )
                default = await http.get(
                    stack.url + "/health/live", headers={"Origin": "https://app.example"}
                )
            assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
            assert "Access-Control-Allow-Origin" not in other.headers
            assert simple.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Access-Control-Allow-Origin" not in default.headers
        finally:
            await trio.to_thread.run_sync(proc.terminate)


async def test_info_and_openapi(stack: Stack) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            info = (await http.get(stack.url + "/")).json()
            spec = (await http.get(stack.url + "/openapi.json")).json()
        assert info["service"] == "artstore-ingester"
        assert spec["openapi"].startswith("3.1")
        assert "/api/v1/files/upload" in spec["paths"]
        # Every endpoint the service info names is described (the docs page is off here).
        named = [
            path
            for value in info["endpoints"].values()
            for path in (value if isinstance(value, list) else [value])
        ]
        assert "/api/v1/uploads" in named
        assert "/docs" not in named
        assert set(named) <= set(spec["paths"])
