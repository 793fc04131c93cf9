"""The request-head caps of `ingester.server`: bytes, header fields, HTTP/2, on a head seen
whole or in part (the caps must hold however the bytes were cut). Pure, no I/O."""

from __future__ import annotations

import pytest

from ingester.server import head_problem


def head(fields: int, value: str = "v", *, end: bool = True, lf_only: bool = False) -> bytes:
    eol = "\n" if lf_only else "\r\n"
    lines = ["GET /health/live HTTP/1.1", *(f"X-F{n}: {value}" for n in range(fields))]
    text = eol.join(lines) + eol + (eol if end else "")
    return text.encode()


def check(data: bytes) -> tuple[int, str] | None:
    problem = head_problem(data, max_bytes=1024, max_headers=10)
    return None if problem is None else (problem.status, problem.code)


@pytest.mark.parametrize("lf_only", [False, True])
def test_a_head_within_the_caps_passes(lf_only: bool) -> None:
    assert check(head(10, lf_only=lf_only)) is None
    assert check(head(10, lf_only=lf_only, end=False)) is None


@pytest.mark.parametrize("lf_only", [False, True])
@pytest.mark.parametrize("end", [True, False])
def test_one_field_too_many_is_431_whole_or_in_part(end: bool, lf_only: bool) -> None:
    assert check(head(11, end=end, lf_only=lf_only)) == (431, "REQUEST_HEADERS_TOO_LARGE")


def test_too_many_bytes_is_431_whole_or_in_part() -> None:
    big = head(1, "b" * 1100)
    assert check(big) == (431, "REQUEST_HEADERS_TOO_LARGE")
    assert check(big[:1025]) == (431, "REQUEST_HEADERS_TOO_LARGE")
    # Not yet past the cap: it may still end in time.
    assert check(big[:1000]) is None


def test_the_body_after_a_head_is_not_counted() -> None:
    data = head(2) + b"x" * 5000 + b"\n" * 50
    assert check(data) is None


def test_a_head_ending_exactly_at_the_cap_passes() -> None:
    data = head(1, "")
    data = data[:-4] + b"v" * (1024 - len(data)) + b"\r\n\r\n"
    assert len(data) == 1024
    assert check(data) is None
    assert check(data[:-4] + b"v\r\n\r\n") == (431, "REQUEST_HEADERS_TOO_LARGE")


def test_http2_prior_knowledge_is_505() -> None:
    assert check(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == (505, "HTTP_VERSION_NOT_SUPPORTED")
