"""SIGTERM with uploads in flight: readiness turns 503 at once, new uploads are refused with
Retry-After, uploads that finish within the grace period succeed, the others are cancelled
and leave nothing behind, and the process exits 0 with no spool left."""

from __future__ import annotations

import signal
import uuid

import httpx
import trio

from tests.conftest import Stack, TokenFactory
from tests.support.client import MultipartUpload, auth, post_upload, send_stream
from tests.support.waiting import eventually


class TrickleBody(httpx.AsyncByteStream):
    """A multipart body sent slowly: `pieces` file pieces, one every `every_s` seconds."""

    def __init__(self, upload: MultipartUpload, every_s: float) -> None:
        self._parts = upload.parts()
        self._every_s = every_s

    def __aiter__(self) -> TrickleBody:
        return self

    async def __anext__(self) -> bytes:
        await trio.sleep(self._every_s)
        try:
            return next(self._parts)
        except StopIteration:
            raise StopAsyncIteration from None


async def test_sigterm_drains_then_cancels_and_exits_cleanly(
    stack: Stack, token: TokenFactory
) -> None:
    proc = await trio.to_thread.run_sync(
        lambda: stack.start_ingester(
            "draining", INGESTER_SHUTDOWN_GRACE_S="4", INGESTER_CLIENT_IDLE_TIMEOUT_S="30"
        )
    )
    popen = proc.popen
    assert popen is not None
    before = stack.all_files()
    results: dict[str, httpx.Response | Exception] = {}
    fields = [("retention_policy", "temporary"), ("compress", "false")]

    async def upload(name: str, pieces: int, every_s: float) -> None:
        body = MultipartUpload([b"x" * 10_000] * pieces, fields=fields)
        headers = auth(
            token(sub=name),
            **{
                "Content-Type": body.content_type,
                "Transfer-Encoding": "chunked",
                "X-Upload-ID": str(uuid.uuid4()),
            },
        )
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                results[name] = await send_stream(
                    http,
                    "POST",
                    proc.url + "/api/v1/files/upload",
                    TrickleBody(body, every_s),
                    headers,
                )
        except httpx.HTTPError as exc:
            results[name] = exc

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            # 15 pieces at 0.2 s: done about 2.4 s after the signal, inside the 4 s grace period.
            nursery.start_soon(upload, "quick", 10, 0.2)
            # Would need about 40 s: still running when the grace period ends.
            nursery.start_soon(upload, "slow", 200, 0.2)
            await trio.sleep(0.6)
            popen.send_signal(signal.SIGTERM)
            signalled = trio.current_time()
            async with httpx.AsyncClient(trust_env=False) as http:
                ready = await http.get(proc.url + "/health/ready")
                refused = await post_upload(
                    http, proc.url, token(sub="late"), MultipartUpload([b"l"])
                )
            assert ready.status_code == 503
            assert "shutting down" in ready.json()["reasons"]
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "SHUTTING_DOWN"
            assert int(refused.headers["Retry-After"]) > 0
            assert trio.current_time() - signalled < 1.0
        exit_code = await trio.to_thread.run_sync(popen.wait)
        stopped_after = trio.current_time() - signalled

    quick = results["quick"]
    assert isinstance(quick, httpx.Response), quick
    assert quick.status_code == 201, quick.text
    slow = results["slow"]
    # Cancelled at the end of the grace period: the connection closes without a 201.
    assert not (isinstance(slow, httpx.Response) and slow.status_code == 201)
    assert exit_code == 0, proc.log_tail()
    # The grace period (4 s) plus hypercorn's own short grace for what is left.
    assert 4.0 <= stopped_after < 11.0
    # Only the quick upload's data file and attr.json are new: the slow one left nothing,
    # not even a temporary file, once the elements have settled.
    await eventually(lambda: len(stack.all_files() - before) == 2, timeout_s=3)
    assert all("/.tmp/" not in str(p) for p in stack.all_files() - before)
    assert not any((stack.root / "draining" / "spool").glob("*"))
