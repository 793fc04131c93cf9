"""Uploads through a real ingester into real reference Storage Elements.

Each test checks what a client would: the status and body, that the bytes stored on the
element equal the bytes sent (sha256 of the download), and, for failures, that nothing is
left in any element's data directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json

import brotli
import httpx
import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.support.client import (
    MIB,
    MultipartUpload,
    auth,
    post_upload,
    random_chunks,
    send_stream,
    text_chunks,
)


async def download(http: httpx.AsyncClient, se_url: str, file_id: str, token: str) -> bytes:
    response = await http.get(f"{se_url}/api/v1/files/{file_id}/download", headers=auth(token))
    assert response.status_code == 200, response.text
    return response.content


def element_url(stack: Stack, element_id: str) -> str:
    return next(se.url for se in stack.elements if se.element_id == element_id)


@pytest.mark.parametrize("size", [0, 1, 3 * MIB + 17])
async def test_upload_sizes_round_trip(stack: Stack, token: TokenFactory, size: int) -> None:
    with trio.fail_after(30):
        body = MultipartUpload(random_chunks(size, seed=size), filename="blob.bin")
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await post_upload(http, stack.url, token(), body)
            assert response.status_code == 201, response.text
            result = response.json()
            assert result["checksum"] == body.sha256
            assert result["file_size"] == size == body.size
            assert result["stored_size"] == size
            assert result["compressed"] is False
            assert result["retention_policy"] == "temporary"
            assert result["storage_element_id"] == "se-edit"
            assert result["ttl_expires_at"] is not None
            stored = await download(http, stack.se_edit.url, result["file_id"], token())
            assert hashlib.sha256(stored).hexdigest() == body.sha256
            assert response.headers["X-Request-ID"]


async def test_every_contract_field_is_in_the_answer(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(15):
        body = MultipartUpload(
            [b"contract"],
            filename="notes.txt",
            file_content_type="text/plain",
            fields=[("description", "quarterly notes"), ("metadata", '{"project": "x"}')],
        )
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await post_upload(http, stack.url, token(), body)
        assert response.status_code == 201, response.text
        result = response.json()
        for key in (
            "file_id", "upload_id", "original_filename", "storage_filename", "content_type",
            "file_size", "stored_size", "compressed", "compression_algorithm",
            "compression_ratio", "checksum", "uploaded_at", "retention_policy",
            "ttl_expires_at", "storage_element_id", "storage_element_url",
        ):  # fmt: skip
            assert key in result, key
        assert result["original_filename"] == "notes.txt"
        assert result["content_type"] == "text/plain"
        attr = next(
            p
            for p in stack.se_edit.stored_files()
            if p.name.endswith(result["file_id"] + ".txt.attr.json")
        )
        record = json.loads(attr.read_text())
        assert record["description"] == "quarterly notes"
        assert record["metadata"]["project"] == "x"
        assert record["checksum"] == result["checksum"]


async def test_a_quoted_filename_reaches_the_element_as_sent(
    stack: Stack, token: TokenFactory
) -> None:
    """A `"` in a name travels as a quoted-pair both ways (`http.multipart_writer`): the
    element records the client's name, not a percent-encoded one."""
    with trio.fail_after(15):
        # As the part header has it; the name is a q"uote.txt.
        body = MultipartUpload([b"x"], filename='a q\\"uote.txt')
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await post_upload(http, stack.url, token(), body)
        assert response.status_code == 201, response.text
        result = response.json()
        assert result["original_filename"] == 'a q"uote.txt'
        attr = next(
            p
            for p in stack.se_edit.stored_files()
            if p.name.endswith(result["file_id"] + ".txt.attr.json")
        )
        assert json.loads(attr.read_text())["original_filename"] == 'a q"uote.txt'


@pytest.mark.parametrize("file_first", [False, True])
async def test_permanent_goes_to_an_rw_element_whatever_the_field_order(
    stack: Stack, token: TokenFactory, file_first: bool
) -> None:
    with trio.fail_after(20):
        before = stack.all_files()
        body = MultipartUpload(
            random_chunks(2 * MIB, seed=5),
            fields=[("retention_policy", "permanent"), ("description", "late fields")],
            file_first=file_first,
        )
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await post_upload(http, stack.url, token(), body)
            assert response.status_code == 201, response.text
            result = response.json()
            assert result["storage_element_id"] == "se-rw"
            assert result["ttl_expires_at"] is None
            stored = await download(http, stack.se_rw.url, result["file_id"], token())
        assert hashlib.sha256(stored).hexdigest() == body.sha256
        new_files = stack.all_files() - before
        # Exactly the data file and its attr.json, on se-rw: the abandoned first try on
        # se-edit (file before fields) left nothing.
        assert len(new_files) == 2
        assert all(p.is_relative_to(stack.se_rw.data_dir) for p in new_files)
        assert not any((stack.root / "ingester" / "spool").glob("*"))


async def test_storage_mode_is_mapped_and_ro_refused(stack: Stack, token: TokenFactory) -> None:
    with trio.fail_after(15):
        async with httpx.AsyncClient(trust_env=False) as http:
            ok = await post_upload(
                http, stack.url, token(), MultipartUpload([b"x"], fields=[("storage_mode", "rw")])
            )
            assert ok.status_code == 201, ok.text
            assert ok.json()["retention_policy"] == "permanent"
            refused = await post_upload(
                http, stack.url, token(), MultipartUpload([b"x"], fields=[("storage_mode", "ro")])
            )
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "INVALID_FIELD"


@pytest.mark.parametrize(
    ("algorithm", "decompress"), [("gzip", gzip.decompress), ("brotli", brotli.decompress)]
)
async def test_compression_round_trip(
    stack: Stack, token: TokenFactory, algorithm: str, decompress: object
) -> None:
    with trio.fail_after(30):
        body = MultipartUpload(
            text_chunks(4 * MIB),
            filename="app.log",
            file_content_type="text/plain",
            fields=[("compress", "true"), ("compression_algorithm", algorithm)],
        )
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await post_upload(http, stack.url, token(), body)
            assert response.status_code == 201, response.text
            result = response.json()
            stored = await download(http, stack.se_edit.url, result["file_id"], token())
        assert result["compressed"] is True
        assert result["compression_algorithm"] == algorithm
        assert result["stored_size"] == len(stored) < result["file_size"] / 2
        assert result["compression_ratio"] == pytest.approx(
            result["file_size"] / len(stored), rel=1e-2
        )
        assert callable(decompress)
        original = decompress(stored)
        assert hashlib.sha256(original).hexdigest() == body.sha256 == result["checksum"]


@pytest.mark.parametrize(
    ("chunks", "filename", "content_type", "reason"),
    [
        ([b"tiny"], "a.txt", "text/plain", "below_min_size"),
        (list(random_chunks(MIB, seed=3)), "r.bin", "application/octet-stream", "no_gain"),
        (
            [b"\x89PNG\r\n\x1a\n" + b"\x00" * 200_000],
            "img.dat",
            "application/octet-stream",
            "already_compressed_content",
        ),
        ([b"a" * 100_000], "photo.jpg", "image/jpeg", "already_compressed_type"),
    ],
)
async def test_compression_is_skipped_when_it_cannot_help(
    stack: Stack,
    token: TokenFactory,
    chunks: list[bytes],
    filename: str,
    content_type: str,
    reason: str,
) -> None:
    with trio.fail_after(15):
        body = MultipartUpload(
            chunks, filename=filename, file_content_type=content_type, fields=[("compress", "yes")]
        )
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await post_upload(http, stack.url, token(), body)
            assert response.status_code == 201, response.text
            result = response.json()
            stored = await download(http, stack.se_edit.url, result["file_id"], token())
        assert result["compressed"] is False
        assert result["compression_decision"] == reason
        assert hashlib.sha256(stored).hexdigest() == body.sha256


async def test_content_digest_is_verified(stack: Stack, token: TokenFactory) -> None:
    import base64

    with trio.fail_after(15):
        data = b"digest me" * 1000
        good = "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"
        bad = "sha-256=:" + base64.b64encode(hashlib.sha256(b"other").digest()).decode() + ":"
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False) as http:
            ok = await post_upload(
                http, stack.url, token(), MultipartUpload([data]), headers={"Content-Digest": good}
            )
            assert ok.status_code == 201, ok.text
            after_ok = stack.all_files()
            wrong = await post_upload(
                http, stack.url, token(), MultipartUpload([data]), headers={"Content-Digest": bad}
            )
            malformed = await post_upload(
                http,
                stack.url,
                token(),
                MultipartUpload([data]),
                headers={"Content-Digest": "sha-256=abc"},
            )
        assert wrong.status_code == 400
        assert wrong.json()["error"]["code"] == "DIGEST_MISMATCH"
        assert malformed.status_code == 400
        assert malformed.json()["error"]["code"] == "INVALID_CONTENT_DIGEST"
        assert len(after_ok - before) == 2
        await stack.settled(after_ok)


async def test_progress_is_visible_during_and_after(stack: Stack, token: TokenFactory) -> None:
    """A slow client: progress shows bytes received while the upload runs, then the result."""
    import uuid

    upload_id = str(uuid.uuid4())
    seen: list[dict[str, object]] = []

    class SlowBody(httpx.AsyncByteStream):
        def __init__(self, parts: list[bytes]) -> None:
            self.parts = iter(parts)
            self.first = True

        def __aiter__(self) -> SlowBody:
            return self

        async def __anext__(self) -> bytes:
            if not self.first:
                await trio.sleep(0.3)
            self.first = False
            try:
                return next(self.parts)
            except StopIteration:
                raise StopAsyncIteration from None

    body = MultipartUpload([b"p" * 100_000] * 5)
    parts = list(body.parts())
    with trio.fail_after(20):
        async with httpx.AsyncClient(trust_env=False) as http, trio.open_nursery() as nursery:
            result: list[httpx.Response] = []

            async def send() -> None:
                headers = auth(
                    token(),
                    **{
                        "Content-Type": body.content_type,
                        "X-Upload-ID": upload_id,
                        "Transfer-Encoding": "chunked",
                    },
                )
                result.append(
                    await send_stream(
                        http, "POST", stack.url + "/api/v1/files/upload", SlowBody(parts), headers
                    )
                )

            nursery.start_soon(send)
            while not result:
                await trio.sleep(0.2)
                poll = await http.get(
                    f"{stack.url}/api/v1/files/uploads/{upload_id}", headers=auth(token())
                )
                if poll.status_code == 200:
                    seen.append(poll.json())
            other_user = await http.get(
                f"{stack.url}/api/v1/files/uploads/{upload_id}", headers=auth(token(sub="mallory"))
            )
            final = await http.get(
                f"{stack.url}/api/v1/files/uploads/{upload_id}", headers=auth(token())
            )
        assert result[0].status_code == 201, result[0].text
        assert final.json()["state"] == "done"
        assert final.json()["result"]["file_id"] == result[0].json()["file_id"]
        receiving = [s for s in seen if s["state"] == "receiving"]
        assert receiving, seen
        assert any(0 < int(s["bytes_received"]) < 500_000 for s in receiving)  # type: ignore[call-overload]
        assert other_user.status_code == 404


@pytest.mark.slow
async def test_one_gibibyte_round_trip(stack: Stack, token: TokenFactory) -> None:
    """1 GiB generated on the fly, streamed through, downloaded and hashed on the way out."""
    size = 1024 * MIB
    with trio.fail_after(240):
        body = MultipartUpload(
            random_chunks(size, seed=1024),
            fields=[("retention_policy", "temporary"), ("compress", "false")],
        )
        async with httpx.AsyncClient(trust_env=False, timeout=120) as http:
            response = await post_upload(http, stack.url, token(), body)
            assert response.status_code == 201, response.text
            result = response.json()
            assert result["file_size"] == size
            assert result["checksum"] == body.sha256
            digest = hashlib.sha256()
            received = 0
            async with http.stream(
                "GET",
                f"{stack.se_edit.url}/api/v1/files/{result['file_id']}/download",
                headers=auth(token()),
            ) as download_stream:
                assert download_stream.status_code == 200
                async for chunk in download_stream.aiter_bytes():
                    digest.update(chunk)
                    received += len(chunk)
            # Free the element's disk for the rest of the suite.
            gone = await http.delete(
                f"{stack.se_edit.url}/api/v1/gc/{result['file_id']}", headers=auth(token())
            )
        assert received == size
        assert digest.hexdigest() == body.sha256
        assert gone.status_code == 200
