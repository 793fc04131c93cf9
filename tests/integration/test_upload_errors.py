"""Bad input, bad credentials and bad peers: a precise status and code, nothing left behind,
and the service keeps serving."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from ingester.auth.tokens import make_keycloak_token, make_token
from tests.conftest import Stack, TokenFactory
from tests.support.client import (
    MIB,
    AsyncBody,
    MultipartUpload,
    auth,
    post_upload,
    random_chunks,
    send_stream,
)
from tests.support.http_server import Request, Response, serve_http
from tests.support.metrics import read_metric
from tests.support.processes import ManagedProcess
from tests.support.waiting import eventually


def error_code(response: httpx.Response) -> str:
    payload = response.json()
    assert set(payload) == {"error"}, payload
    assert payload["error"]["request_id"] == response.headers["X-Request-ID"]
    code: str = payload["error"]["code"]
    return code


async def assert_still_serving(http: httpx.AsyncClient, url: str, token: str) -> None:
    response = await post_upload(http, url, token, MultipartUpload([b"still alive"]))
    assert response.status_code == 201, response.text


def multipart_raw(parts: list[tuple[str, str | bytes]], boundary: str = "B0undary") -> bytes:
    out = b""
    for name, value in parts:
        data = value.encode() if isinstance(value, str) else value
        filename = '; filename="f.bin"' if name == "file" else ""
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


NO_TYPE = "(none)"
BAD_FORMS = [
    # (description, body, content type, status, code)
    ("json body", b'{"file": "x"}', "application/json", 415, "UNSUPPORTED_MEDIA_TYPE"),
    ("no content type", b"abc", NO_TYPE, 415, "UNSUPPORTED_MEDIA_TYPE"),
    ("no boundary", b"abc", "multipart/form-data", 400, "MALFORMED_MULTIPART"),
    ("no file part", multipart_raw([("description", "x")]), None, 400, "MISSING_FILE"),
    (
        "truncated body",
        multipart_raw([("file", b"abc" * 1000)])[:-40],
        None,
        400,
        "MALFORMED_MULTIPART",
    ),
    ("garbage body", b"\x00\x01 not multipart at all", None, 400, "MALFORMED_MULTIPART"),
    (
        "bad ttl",
        multipart_raw([("ttl_days", "0"), ("file", b"x")]),
        None,
        400,
        "INVALID_FIELD",
    ),
    (
        "bad policy",
        multipart_raw([("retention_policy", "forever"), ("file", b"x")]),
        None,
        400,
        "INVALID_FIELD",
    ),
    (
        "bad algorithm",
        multipart_raw([("compress", "true"), ("compression_algorithm", "zip"), ("file", b"x")]),
        None,
        400,
        "INVALID_FIELD",
    ),
    (
        "description too long",
        multipart_raw([("description", "d" * 1001), ("file", b"x")]),
        None,
        400,
        "INVALID_FIELD",
    ),
    (
        "metadata not json",
        multipart_raw([("metadata", "{not json"), ("file", b"x")]),
        None,
        400,
        "INVALID_METADATA",
    ),
    (
        "metadata with a lone surrogate escape",
        multipart_raw([("metadata", '{"a": "\\ud800"}'), ("file", b"x")]),
        None,
        400,
        "INVALID_METADATA",
    ),
    (
        "metadata not an object",
        multipart_raw([("metadata", "[1, 2]"), ("file", b"x")]),
        None,
        400,
        "INVALID_METADATA",
    ),
    (
        "bad field after the file",
        multipart_raw([("file", b"abc" * 100_000), ("ttl_days", "999")]),
        None,
        400,
        "INVALID_FIELD",
    ),
    (
        "two files",
        multipart_raw([("file", b"one"), ("file", b"two")]),
        None,
        400,
        "INVALID_FIELD",
    ),
]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [case[1:] for case in BAD_FORMS],
    ids=[case[0] for case in BAD_FORMS],
)
async def test_bad_forms_are_refused_and_leave_nothing(
    stack: Stack, token: TokenFactory, body: bytes, content_type: str | None, status: int, code: str
) -> None:
    with trio.fail_after(15):
        before = stack.all_files()
        headers = auth(token())
        if content_type != NO_TYPE:
            headers["Content-Type"] = content_type or "multipart/form-data; boundary=B0undary"
        async with httpx.AsyncClient(trust_env=False) as http:
            headers["Content-Length"] = str(len(body))
            response = await send_stream(
                http, "POST", stack.url + "/api/v1/files/upload", AsyncBody(iter([body])), headers
            )
            assert response.status_code == status, response.text
            assert error_code(response) == code
            assert "Traceback" not in response.text
            await trio.sleep(0.2)
            await stack.settled(before)
            await assert_still_serving(http, stack.url, token())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: dict[str, object]) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def hs256_with_public_key(claims: dict[str, object], public_pem: bytes) -> str:
    """The algorithm-confusion attack: HMAC keyed with the RS256 public key."""
    signing_input = (
        _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + "."
        + _b64(json.dumps(claims).encode())
    )
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def claims() -> dict[str, object]:
    now = int(time.time())
    return {
        "sub": "eve",
        "type": "service_account",
        "role": "admin",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }


@pytest.fixture(scope="module")
def bad_tokens(stack: Stack) -> dict[str, str | None]:
    pem = stack.keys.private_pem
    past = time.time() - 7200
    return {
        "missing": None,
        "garbage": "not.a.token",
        "expired": make_token(pem, sub="alice", ttl=60, now=past),
        "not yet valid": make_token(pem, sub="alice", now=time.time() + 3600),
        "refresh": make_token(pem, sub="alice", token_type="refresh"),
        "alg none": unsigned_token(claims()),
        "hs256 with public key": hs256_with_public_key(
            claims(), stack.keys.public_path.read_bytes()
        ),
    }


async def test_metadata_at_the_limit_is_stored_with_the_ingesters_own_facts(
    stack: Stack, token: TokenFactory
) -> None:
    """64 KiB of a client's metadata passes our check; the element must take it with the
    `_ingester` facts added (it used to refuse it, and the client got a 502)."""
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            for size in (65_400, 65_528):
                metadata = json.dumps({"k": "v" * (size - 8)}, separators=(",", ":"))
                assert len(metadata) == size
                body = MultipartUpload(
                    random_chunks(1000, seed=size), fields=[("metadata", metadata)]
                )
                response = await post_upload(http, stack.url, token(), body)
                assert response.status_code == 201, response.text
                assert response.json()["checksum"] == body.sha256
            over = MultipartUpload(
                random_chunks(1000, seed=1),
                fields=[("metadata", json.dumps({"k": "v" * 65_600}))],
            )
            response = await post_upload(http, stack.url, token(), over)
            assert response.status_code == 400, response.text
            assert error_code(response) == "INVALID_METADATA"


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "garbage",
        "expired",
        "not yet valid",
        "refresh",
        "alg none",
        "hs256 with public key",
    ],
)
async def test_bad_tokens_get_401(
    stack: Stack, bad_tokens: dict[str, str | None], case: str
) -> None:
    with trio.fail_after(10):
        before = stack.all_files()
        value = bad_tokens[case]
        body = MultipartUpload([b"secret"])
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await post_upload(http, stack.url, value or "", body, stream=False)
        assert response.status_code == 401, response.text
        assert error_code(response) == "UNAUTHORIZED"
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
        await stack.settled(before)


@pytest.mark.parametrize(
    ("role", "status"), [("readonly", 403), ("auditor", 403), ("operator", 201), ("admin", 201)]
)
async def test_roles(stack: Stack, token: TokenFactory, role: str, status: int) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await post_upload(http, stack.url, token(role=role), MultipartUpload([b"r"]))
        assert response.status_code == status, response.text
        if status == 403:
            assert error_code(response) == "FORBIDDEN"


async def test_keycloak_scope_can_upload(stack: Stack) -> None:
    with trio.fail_after(10):
        pem = stack.keys.private_pem
        writer = make_keycloak_token(pem, sub="kc-1", username="kc", scope="openid files:write")
        reader = make_keycloak_token(
            pem, sub="kc-2", username="kc2", roles=["readonly"], scope="openid"
        )
        async with httpx.AsyncClient(trust_env=False) as http:
            ok = await post_upload(http, stack.url, writer, MultipartUpload([b"k"]))
            denied = await post_upload(http, stack.url, reader, MultipartUpload([b"k"]))
        assert ok.status_code == 201, ok.text
        assert denied.status_code == 403


@pytest.fixture(scope="module")
def small(stack: Stack) -> Iterator[ManagedProcess]:
    """An ingester with tight limits, sharing the stack's Storage Elements."""
    proc = stack.start_ingester(
        "small",
        INGESTER_MAX_FILE_SIZE=str(MIB),
        INGESTER_MAX_UPLOADS_IN_FLIGHT="2",
        INGESTER_MAX_UPLOADS_PER_USER="1",
        INGESTER_CLIENT_IDLE_TIMEOUT_S="1.5",
    )
    yield proc
    assert proc.terminate() == 0


async def test_counted_size_over_the_limit_is_413(
    stack: Stack, small: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(20):
        before = stack.all_files()
        body = MultipartUpload(random_chunks(3 * MIB, seed=9))
        async with httpx.AsyncClient(trust_env=False) as http:
            # Streamed (chunked): the size is only known by counting.
            response = await post_upload(http, small.url, token(), body)
            assert response.status_code == 413, response.text
            assert error_code(response) == "FILE_TOO_LARGE"
            await stack.settled(before)
            await assert_still_serving(http, small.url, token())


async def test_declared_size_over_the_limit_is_413(
    stack: Stack, small: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(20):
        before = stack.all_files()
        body = MultipartUpload(random_chunks(3 * MIB, seed=9))
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await post_upload(http, small.url, token(), body, stream=False)
        assert response.status_code == 413, response.text
        assert error_code(response) == "FILE_TOO_LARGE"
        await stack.settled(before)


async def raw_request(url: str, head: str, body_prefix: bytes) -> trio.SocketStream:
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(head.encode() + body_prefix)
    return stream


def upload_head(token: str, *, length: int, upload_id: str | None = None) -> str:
    extra = f"X-Upload-ID: {upload_id}\r\n" if upload_id else ""
    return (
        "POST /api/v1/files/upload HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: multipart/form-data; boundary=B0undary\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    )


FILE_HEAD = b'--B0undary\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n\r\n'


async def read_response(stream: trio.SocketStream) -> tuple[int, bytes]:
    """Status and the whole response (headers, then the body by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length is not None and len(body) < int(length.group(1)):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


async def test_idle_client_gets_408(
    stack: Stack, small: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(15):
        before = stack.all_files()
        stream = await raw_request(
            small.url, upload_head(token(), length=10 * 1024), FILE_HEAD + b"x" * 1000
        )
        started = trio.current_time()
        status, raw = await read_response(stream)
        waited = trio.current_time() - started
        await stream.aclose()
        assert status == 408, raw
        assert b'"CLIENT_TIMEOUT"' in raw
        assert 1.0 <= waited < 6.0
        await stack.settled(before)


async def test_client_disconnect_cancels_the_element_request(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(20):
        upload_id = str(uuid.uuid4())
        before = stack.all_files()
        tmp_dir = stack.se_edit.data_dir / ".tmp"
        stream = await raw_request(
            stack.url, upload_head(token(), length=200 * MIB, upload_id=upload_id), FILE_HEAD
        )
        for chunk in random_chunks(8 * MIB, seed=4):
            await stream.send_all(chunk)
        # The element is receiving: its temporary file exists.
        await eventually(lambda: any(tmp_dir.iterdir()), timeout_s=5)
        await stream.aclose()
        # Within a second of the client leaving, the element's request is gone with its file.
        await eventually(lambda: not any(tmp_dir.iterdir()), timeout_s=1.0)
        await stack.settled(before)
        async with httpx.AsyncClient(trust_env=False) as http:
            with trio.fail_after(3):
                while True:
                    progress = await http.get(
                        f"{stack.url}/api/v1/files/uploads/{upload_id}", headers=auth(token())
                    )
                    if progress.json()["state"] == "cancelled":
                        break
                    await trio.sleep(0.05)
            await assert_still_serving(http, stack.url, token())


async def test_caps_on_uploads_in_flight(
    stack: Stack, small: ManagedProcess, token: TokenFactory
) -> None:
    """`small` allows 2 uploads in flight and 1 per user."""
    with trio.fail_after(20):
        body_len = MIB  # under the limit: the holders must be admitted
        holders = []
        for user in ("holder-1", "holder-2"):
            stream = await raw_request(
                small.url, upload_head(token(sub=user), length=body_len), FILE_HEAD
            )
            holders.append(stream)
        # The holders keep sending slowly so the idle timeout does not end them.
        async with httpx.AsyncClient(trust_env=False) as http, trio.open_nursery() as nursery:

            async def trickle(stream: trio.SocketStream) -> None:
                while True:
                    await stream.send_all(b"z" * 1024)
                    await trio.sleep(0.2)

            for stream in holders:
                nursery.start_soon(trickle, stream)
            await trio.sleep(0.5)
            same_user = await post_upload(
                http, small.url, token(sub="holder-1"), MultipartUpload([b"a"])
            )
            other_user = await post_upload(
                http, small.url, token(sub="newcomer"), MultipartUpload([b"b"])
            )
            nursery.cancel_scope.cancel()
        for stream in holders:
            await stream.aclose()
        assert same_user.status_code == 429, same_user.text
        assert error_code(same_user) == "TOO_MANY_UPLOADS"
        assert int(same_user.headers["Retry-After"]) > 0
        assert other_user.status_code == 503, other_user.text
        assert error_code(other_user) == "SERVICE_BUSY"
        assert int(other_user.headers["Retry-After"]) > 0


class LyingElement:
    """An element that answers every upload `201` with a checksum of zeros (other bytes than
    it was sent), and accepts every removal."""

    def __init__(self) -> None:
        self.uploads: list[str] = []

    async def __call__(self, request: Request) -> Response:
        if request.path == "/api/v1/files/upload":
            file_id = (
                request.body.split(b'name="file_id"\r\n\r\n', 1)[1].split(b"\r\n", 1)[0].decode()
            )
            self.uploads.append(file_id)
            return Response.json(
                {
                    "file_id": file_id,
                    "original_filename": "f",
                    "file_size": 5,
                    "checksum": "0" * 64,
                    "message": "ok",
                },
                status=201,
            )
        if request.path.startswith("/api/v1/gc/"):
            return Response.json({"deleted": True})
        return Response.json({"status": "ok"})


@asynccontextmanager
async def _ingester_over(
    stack: Stack, name: str, entries: list[dict[str, object]]
) -> AsyncIterator[ManagedProcess]:
    proc = await trio.to_thread.run_sync(lambda: _start_with_elements(stack, name, entries))
    try:
        yield proc
    finally:
        await trio.to_thread.run_sync(proc.terminate)


async def _upload_once(proc: ManagedProcess, token: TokenFactory, data: bytes) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as http:
        return await post_upload(http, proc.url, token(), MultipartUpload([data]))


async def _mismatches(url: str, element_id: str) -> float:
    return await read_metric(
        url,
        "ingester_storage_element_errors_total",
        element_id=element_id,
        kind="CHECKSUM_MISMATCH",
    )


async def test_an_element_that_stores_other_bytes_is_failed_over_from(
    stack: Stack, token: TokenFactory
) -> None:
    """An element that reports other bytes than it was sent is failing: its copy is removed,
    it counts a failure, and the upload goes on to the next element from the failover copy.
    The client sees a `201` with the right checksum."""
    liar = LyingElement()
    data = b"hello"
    with trio.fail_after(30):
        async with serve_http(liar) as server:
            # Tried first (artStore's priority: lowest first), then the real element.
            entries: list[dict[str, object]] = [
                {"id": "liar", "api_url": server.url, "mode": "edit", "priority": 1},
                stack.se_edit.registry_entry(priority=100),
            ]
            before = stack.all_files()
            async with _ingester_over(stack, "failover-ingester", entries) as proc:
                response = await _upload_once(proc, token, data)
                assert response.status_code == 201, response.text
                body = response.json()
                assert body["checksum"] == hashlib.sha256(data).hexdigest()
                assert body["storage_element_id"] == stack.se_edit.element_id
                assert len(liar.uploads) == 1
                assert server.count(f"/api/v1/gc/{liar.uploads[0]}", method="DELETE") == 1
                assert await _mismatches(proc.url, "liar") == 1
                stored = stack.all_files() - before
                assert [p.read_bytes() for p in stored if not p.name.endswith(".json")] == [data]


async def test_with_no_other_element_a_checksum_mismatch_is_503_and_the_copy_removed(
    stack: Stack, token: TokenFactory
) -> None:
    """The lying element alone: no element left to take the file, `503 NO_STORAGE_AVAILABLE`
    with `Retry-After`, the lie in the message; the copy removed, the element never sent the
    file twice, one failure counted."""
    liar = LyingElement()
    with trio.fail_after(30):
        async with serve_http(liar) as server:
            entry: dict[str, object] = {"id": "liar", "api_url": server.url, "mode": "edit"}
            async with _ingester_over(stack, "liar-ingester", [entry]) as proc:
                response = await _upload_once(proc, token, b"hello")
                assert response.status_code == 503, response.text
                assert error_code(response) == "NO_STORAGE_AVAILABLE"
                assert int(response.headers["Retry-After"]) > 0
                assert "reports sha256 " + "0" * 64 in response.json()["error"]["message"]
                assert len(liar.uploads) == 1
                assert server.count(f"/api/v1/gc/{liar.uploads[0]}", method="DELETE") == 1
                assert await _mismatches(proc.url, "liar") == 1


async def test_two_elements_reporting_the_same_other_bytes_fail_the_upload_502(
    stack: Stack, token: TokenFactory
) -> None:
    """Two elements that agree on a checksum that is not ours mean the bytes sent were not
    the bytes hashed (a spool read back wrong, say): no third element would help. `502
    CHECKSUM_MISMATCH`, and both copies are removed."""
    first, second = LyingElement(), LyingElement()
    with trio.fail_after(30):
        async with serve_http(first) as one, serve_http(second) as two:
            entries: list[dict[str, object]] = [
                {"id": "liar-1", "api_url": one.url, "mode": "edit", "priority": 1},
                {"id": "liar-2", "api_url": two.url, "mode": "edit", "priority": 2},
            ]
            async with _ingester_over(stack, "agreeing-ingester", entries) as proc:
                response = await _upload_once(proc, token, b"hello")
                assert response.status_code == 502, response.text
                assert error_code(response) == "CHECKSUM_MISMATCH"
                assert (len(first.uploads), len(second.uploads)) == (1, 1)
                assert one.count(f"/api/v1/gc/{first.uploads[0]}", method="DELETE") == 1
                await eventually(
                    lambda: two.count(f"/api/v1/gc/{second.uploads[0]}", method="DELETE") == 1,
                    timeout_s=10,
                )
                # The first counts a failure; the second, which agreed, does not.
                assert await _mismatches(proc.url, "liar-1") == 1
                assert await _mismatches(proc.url, "liar-2") == 0


def _start_with_elements(
    stack: Stack, name: str, elements: list[dict[str, object]]
) -> ManagedProcess:
    from tests.support.processes import start_ingester

    proc = start_ingester(
        stack.root, name=name, public_key=stack.keys.public_path, elements=elements
    )
    proc.wait_ready()
    return proc


async def test_failed_uploads_give_their_memory_budget_back(
    stack: Stack, token: TokenFactory
) -> None:
    """Every failure path returns the budget: after many refused forms it is back at zero."""
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False) as http:
            for body, _, _, _ in [case[1:] for case in BAD_FORMS if case[2] is None]:
                headers = auth(
                    token(), **{"Content-Type": "multipart/form-data; boundary=B0undary"}
                )
                headers["Content-Length"] = str(len(body))
                await send_stream(
                    http,
                    "POST",
                    stack.url + "/api/v1/files/upload",
                    AsyncBody(iter([body])),
                    headers,
                )
            metrics = (await http.get(stack.url + "/metrics")).text
        assert "ingester_memory_budget_used_bytes 0.0" in metrics
