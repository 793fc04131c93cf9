"""An element (or a proxy in front of it) that answers 200 with something other than a JSON
object: each call of the element client fails as the element's fault (StorageElementError,
502/503 upstream), never as a bug of ours (500). Against a real HTTP server on loopback."""

from __future__ import annotations

import uuid

import httpx
import pytest
import trio

from ingester.errors import StorageElementError
from ingester.storage.client import StorageElementClient
from tests.support.http_server import Request, Response, serve_http

HTML = Response(
    200, b"<html><body>Welcome to nginx!</body></html>", [("content-type", "text/html")]
)
NOT_AN_OBJECT = Response.json(["a", "list"])


@pytest.mark.parametrize(
    ("answer", "says"), [(HTML, "not JSON (text/html)"), (NOT_AN_OBJECT, "not an object")]
)
async def test_metadata_exists_and_info_refuse_a_body_that_is_not_a_json_object(
    answer: Response, says: str
) -> None:
    async def element(request: Request) -> Response:
        return answer

    file_id = str(uuid.uuid4())
    with trio.fail_after(10):
        async with serve_http(element) as server, httpx.AsyncClient(trust_env=False) as http:
            client = StorageElementClient(
                http,
                stall_timeout_s=2,
                response_timeout_s=2,
                connect_timeout_s=2,
                probe_timeout_s=2,
            )
            calls = [
                client.metadata("se-x", server.url, file_id, authorization=None),
                client.exists("se-x", server.url, file_id, authorization=None),
                client.info("se-x", server.url),
            ]
            for call in calls:
                with pytest.raises(StorageElementError) as caught:
                    await call
                assert caught.value.status == 502
                assert "se-x answered 200" in caught.value.message
                assert says in caught.value.message
    assert [r.path for r in server.requests] == [
        f"/api/v1/files/{file_id}",
        f"/api/v1/gc/{file_id}/exists",
        "/api/v1/info",
    ]
