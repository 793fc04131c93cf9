"""Attacks through the upload's optional headers (B7, B8): someone else's `X-Upload-ID`, an
`Idempotency-Key` held by a request still running, and a `Content-Digest` we would not
check."""

from __future__ import annotations

import base64
import hashlib
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.hostile.common import assert_unharmed, error_code, until
from tests.support.client import MultipartUpload, auth, post_upload, send_stream

DATA = b"the bytes the client means to store\n" * 100


def stored_by(stack: Stack, response: httpx.Response) -> set[Path]:
    """The files a `201` put on its element: the data file and its attributes (both names
    carry the file id)."""
    result = response.json()
    (element,) = [se for se in stack.elements if se.element_id == result["storage_element_id"]]
    found = {p for p in element.stored_files() if result["file_id"] in p.name}
    assert len(found) == 2, (result, found)
    return found


def digest(algorithm: str, data: bytes) -> str:
    raw = hashlib.new(algorithm.replace("-", ""), data).digest()
    return f"{algorithm}=:{base64.b64encode(raw).decode()}:"


# --- B7: X-Upload-ID and Idempotency-Key ------------------------------------------------------


async def test_another_users_upload_id_is_answered_as_an_unknown_one(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            chosen = str(uuid.uuid4())
            alice = await post_upload(
                http, stack.url, token(), MultipartUpload([b"alice's"]),
                headers={"X-Upload-ID": chosen},
            )  # fmt: skip
            assert alice.status_code == 201, alice.text
            # Mallory tries alice's id, and a fresh one: the same answer for both.
            answers = []
            for upload_id in (chosen, str(uuid.uuid4())):
                mallory = await post_upload(
                    http, stack.url, token(sub="mallory"), MultipartUpload([b"mallory's"]),
                    headers={"X-Upload-ID": upload_id},
                )  # fmt: skip
                answers.append(mallory)
            assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
            assert answers[0].json()["upload_id"] == chosen
            # Each sees their own upload under the id; neither sees the other's.
            for sub, response in (("alice", alice), ("mallory", answers[0])):
                progress = await http.get(
                    f"{stack.url}/api/v1/files/uploads/{chosen}", headers=auth(token(sub=sub))
                )
                assert progress.status_code == 200, progress.text
                assert progress.json()["upload_id"] == chosen
                assert progress.json()["result"]["file_id"] == response.json()["file_id"]
            # Reusing one's own id is the caller's own business: a precise 409.
            again = await post_upload(
                http, stack.url, token(), MultipartUpload([b"again"]),
                headers={"X-Upload-ID": chosen},
            )  # fmt: skip
            assert again.status_code == 409, again.text
            assert error_code(again) == "UPLOAD_ID_IN_USE"
            # Free again when its progress record goes (5 minutes after the end).
            assert 1 <= int(again.headers["Retry-After"]) <= 300
        stored = set().union(*(stored_by(stack, r) for r in (alice, *answers)))
        await assert_unharmed(stack, stack.url, before | stored)


class Held(httpx.AsyncByteStream):
    """A multipart body that stops after its first part until `release` is set."""

    def __init__(self, upload: MultipartUpload, release: trio.Event) -> None:
        self._parts = upload.parts()
        self._release = release
        self._first = True

    def __aiter__(self) -> Held:
        return self

    async def __anext__(self) -> bytes:
        if not self._first:
            await self._release.wait()
        self._first = False
        try:
            return next(self._parts)
        except StopIteration:
            raise StopAsyncIteration from None


async def test_a_repeat_while_the_first_runs_is_told_when_to_retry(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        key = f"retry-hint-{uuid.uuid4()}"
        first_id = str(uuid.uuid4())
        release = trio.Event()
        first_answer: list[httpx.Response] = []
        async with (
            httpx.AsyncClient(trust_env=False, timeout=20) as http,
            trio.open_nursery() as nursery,
        ):
            body = MultipartUpload([b"first"] * 3)

            async def first() -> None:
                headers = auth(
                    token(),
                    **{
                        "Content-Type": body.content_type,
                        "Transfer-Encoding": "chunked",
                        "Idempotency-Key": key,
                        "X-Upload-ID": first_id,
                    },
                )
                url = stack.url + "/api/v1/files/upload"
                first_answer.append(
                    await send_stream(http, "POST", url, Held(body, release), headers)
                )

            nursery.start_soon(first)

            # The first request holds the key once its progress shows (claim, then ingest).
            async def claimed() -> bool:
                progress = f"{stack.url}/api/v1/files/uploads/{first_id}"
                return (await http.get(progress, headers=auth(token()))).status_code == 200

            await until(claimed, timeout_s=10)
            repeat = await post_upload(
                http, stack.url, token(), MultipartUpload([b"first"] * 3),
                headers={"Idempotency-Key": key},
            )  # fmt: skip
            assert repeat.status_code == 409, repeat.text
            assert error_code(repeat) == "IDEMPOTENCY_IN_PROGRESS"
            retry_after = int(repeat.headers["Retry-After"])
            # At most the claim's lease: how long a dead first request could hold the key.
            assert 1 <= retry_after <= 30, retry_after
            release.set()
        assert first_answer[0].status_code == 201, first_answer[0].text
        # One file (and its attributes) for the one 201: the repeat stored nothing.
        await assert_unharmed(stack, stack.url, before | stored_by(stack, first_answer[0]))


# --- B8: Content-Digest ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [
        (digest("sha-512", b"other bytes"), 400, "DIGEST_MISMATCH"),
        ("md5=:" + base64.b64encode(hashlib.md5(DATA).digest()).decode() + ":", 400,
         "UNSUPPORTED_CONTENT_DIGEST"),
        ("unixsum=30637", 400, "UNSUPPORTED_CONTENT_DIGEST"),
        # Both named: each one supported is checked, the wrong one fails the upload.
        (f"{digest('sha-256', DATA)}, {digest('sha-512', b'x')}", 400, "DIGEST_MISMATCH"),
    ],
    ids=["wrong sha-512", "md5 only", "unixsum only", "right sha-256, wrong sha-512"],
)  # fmt: skip
async def test_a_digest_that_would_not_be_checked_is_refused(
    stack: Stack, token: TokenFactory, header: str, status: int, code: str
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            response = await post_upload(
                http, stack.url, token(), MultipartUpload([DATA]),
                headers={"Content-Digest": header},
            )  # fmt: skip
            assert response.status_code == status, response.text
            assert error_code(response) == code
            if code == "UNSUPPORTED_CONTENT_DIGEST":
                assert "sha-256" in response.json()["error"]["message"]
                assert "sha-512" in response.json()["error"]["message"]
                assert "sha-512" in response.headers["Want-Content-Digest"]
        await assert_unharmed(stack, stack.url, before)


async def test_a_right_sha512_digest_is_checked_and_stored(
    stack: Stack, token: TokenFactory
) -> None:
    """The control: sha-512 alone is verified (a wrong one is refused above)."""
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            response = await post_upload(
                http, stack.url, token(), MultipartUpload([DATA]),
                headers={"Content-Digest": digest("sha-512", DATA)},
            )  # fmt: skip
            assert response.status_code == 201, response.text
            assert response.json()["checksum"] == hashlib.sha256(DATA).hexdigest()
