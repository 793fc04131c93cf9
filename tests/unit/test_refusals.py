"""Which element answers end an upload and which move it on; how a readiness answer reads.
Pure: httpx responses built in memory, no I/O."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from ingester.errors import (
    StorageElementError,
    StorageElementFull,
    StorageElementModeRefused,
    StorageElementRejected,
    StorageElementUnavailable,
)
from ingester.storage.client import StorageElementClient, raise_for_status
from ingester.storage.refusals import repeated_refusal


def response(status: int, body: Any) -> httpx.Response:
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        request=httpx.Request("POST", "http://se/api/v1/files/upload"),
    )


def answered(element_id: str, status: int, body: Any) -> StorageElementError:
    with pytest.raises(StorageElementError) as caught:
        raise_for_status(response(status, body), element_id)
    return caught.value


CREATE_FAILED = {"detail": "Failed to create file"}


def test_two_identical_500s_from_two_elements_end_the_upload() -> None:
    failures = [answered("a", 500, CREATE_FAILED)]
    assert repeated_refusal(failures) is None
    failures.append(answered("b", 500, CREATE_FAILED))
    refusal = repeated_refusal(failures)
    assert isinstance(refusal, StorageElementRejected)
    assert refusal.retryable is False
    assert refusal.status == 502
    assert refusal.code == "STORAGE_ELEMENT_REJECTED"
    assert "a and b refused this file alike (500: Failed to create file)" in refusal.message


def test_the_same_element_twice_counts_too() -> None:
    failures = [answered("a", 500, CREATE_FAILED), answered("a", 500, CREATE_FAILED)]
    refusal = repeated_refusal(failures)
    assert refusal is not None
    assert "a refused this file twice alike" in refusal.message


@pytest.mark.parametrize(
    "second",
    [
        (500, {"detail": "Failed to upload file"}),  # another message
        (503, CREATE_FAILED),  # unavailable is never the request's fault
        (502, CREATE_FAILED),
        (504, CREATE_FAILED),
    ],
)
def test_different_or_unavailable_answers_move_on(second: tuple[int, Any]) -> None:
    status, body = second
    failures = [answered("a", 500, CREATE_FAILED), answered("b", status, body)]
    assert repeated_refusal(failures) is None


def test_an_identical_pair_later_in_the_list_is_found() -> None:
    failures: list[StorageElementError] = [
        answered("a", 500, CREATE_FAILED),
        StorageElementUnavailable("b: cannot connect", element_id="b"),
        answered("c", 500, CREATE_FAILED),
    ]
    assert repeated_refusal(failures) is not None
    assert repeated_refusal(failures[:2]) is None


@pytest.mark.parametrize(
    "body",
    [
        {"detail": "File upload not allowed in ro mode"},  # artStore
        {"detail": "File upload not allowed in ar mode"},
        {"error": {"code": "READ_ONLY_MODE", "message": "se is in ro mode: no uploads"}},
    ],
)
def test_a_mode_refusal_moves_on_to_another_element(body: Any) -> None:
    error = answered("a", 400, body)
    assert isinstance(error, StorageElementModeRefused)
    assert error.retryable is True
    assert error.upstream_status == 400


def test_fastapi_failing_to_read_our_form_is_the_elements_failure() -> None:
    """artStore's element answers this when its temporary disk cannot take a file part:
    another element may have room, and two of them alike do not end the upload."""
    parse = {"detail": "There was an error parsing the body"}
    error = answered("a", 400, parse)
    assert type(error) is StorageElementError
    assert error.retryable is True
    assert error.upstream_status == 400
    assert repeated_refusal([error, answered("b", 400, parse)]) is None
    # Any other 400 of FastAPI's still ends the upload at once.
    other = answered("a", 400, {"detail": "There was an error parsing the body!"})
    assert isinstance(other, StorageElementRejected)
    assert other.retryable is False


@pytest.mark.parametrize(
    ("status", "body", "kind", "retryable"),
    [
        (400, {"detail": "Invalid file_id format: x"}, StorageElementRejected, False),
        (422, {"detail": [{"loc": ["body", "file"]}]}, StorageElementRejected, False),
        (507, {"error": {"code": "INSUFFICIENT_STORAGE"}}, StorageElementFull, True),
        (429, {"detail": "slow down"}, StorageElementUnavailable, True),
        (500, CREATE_FAILED, StorageElementError, True),
    ],
)
def test_other_answers_keep_their_meaning(
    status: int, body: Any, kind: type[StorageElementError], retryable: bool
) -> None:
    error = answered("a", status, body)
    assert type(error) is kind
    assert error.retryable is retryable


@pytest.mark.parametrize(
    ("status", "content", "ready"),
    [
        (200, b'{"status": "ok"}', True),
        (200, b'{"status": "ready"}', True),
        (200, b"fine", True),
        # artStore's probe answers 200 with its failed checks.
        (200, b'{"status": "degraded", "checks": {"storage_directory": "failed"}}', False),
        (503, b'{"status": "ok"}', False),
    ],
)
async def test_a_readiness_answer_is_read_for_what_it_says(
    status: int, content: bytes, ready: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/health/ready"
        return httpx.Response(status, content=content)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = StorageElementClient(
            http,
            stall_timeout_s=1,
            response_timeout_s=1,
            connect_timeout_s=1,
            probe_timeout_s=1,
        )
        assert await client.probe_ready("a", "http://se") is ready
