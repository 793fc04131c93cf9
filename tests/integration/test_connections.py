"""Connections are closed when their clients close them, not a keep-alive timeout later."""

from __future__ import annotations

import httpx
import psutil
import trio

from tests.conftest import Stack, TokenFactory
from tests.support.client import MultipartUpload, post_upload


def close_wait_sockets(pid: int, port: int) -> int:
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_CLOSE_WAIT and conn.laddr.port == port
    )


async def test_a_client_closing_after_its_upload_closes_the_server_side(
    stack: Stack, token: TokenFactory
) -> None:
    port = int(stack.url.rsplit(":", 1)[1])
    with trio.fail_after(30):
        for _ in range(12):
            # One connection per upload, closed by the client once answered (as curl does).
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                response = await post_upload(
                    http, stack.url, token(), MultipartUpload([b"c" * 200_000])
                )
                assert response.status_code == 201, response.text
        # Keep-alive is 75 s: a socket left half-closed would still be there in 2 s.
        for _ in range(40):
            if close_wait_sockets(stack.ingester.pid, port) == 0:
                break
            await trio.sleep(0.05)
        assert close_wait_sockets(stack.ingester.pid, port) == 0
