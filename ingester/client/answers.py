"""The one place that turns the ingester's answers and httpx's errors into the client's
errors: what is worth another attempt, what ends a file, what ends the command."""

from __future__ import annotations

import contextlib
import email.utils
import time
from typing import Final, NoReturn

import httpx

from .errors import Retryable, TokenRejected, UploadFailed
from .tokens import explain_rejection

# Worth another attempt: the server or the path to it may be back (a restarting replica,
# a full pipeline, an element failing over), or the request was cut short.
RETRYABLE_STATUSES: Final = frozenset({408, 423, 425, 429, 500, 502, 503, 504})
# 409 with this code: the first request under the same Idempotency-Key is still running.
IN_PROGRESS_CODES: Final = frozenset({"IDEMPOTENCY_IN_PROGRESS"})


def error_of(response: httpx.Response) -> tuple[str, str]:
    """The `error.code` and `error.message` of the JSON envelope; for another body, no
    code and the start of the text."""
    try:
        error = response.json()["error"]
        return str(error.get("code", "")), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = response.text.strip().splitlines()
        return "", text[0][:200] if text else ""


def describe(response: httpx.Response) -> str:
    """`507 INSUFFICIENT_STORAGE: no element of mode edit has room`."""
    code, message = error_of(response)
    head = f"{response.status_code} {code}".strip()
    return f"{head}: {message}" if message else head


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def raise_for(response: httpx.Response, token: str) -> NoReturn:
    """An answer that is not the one the request hoped for, as the client's error."""
    status = response.status_code
    code, _ = error_of(response)
    if status in (401, 403):
        explained = explain_rejection(
            status, describe(response), response.headers.get("WWW-Authenticate"), token
        )
        raise TokenRejected(explained, status=status)
    if status in RETRYABLE_STATUSES or (status == 409 and code in IN_PROGRESS_CODES):
        raise Retryable(describe(response), retry_after=retry_after(response))
    if status == 404 and code == "NOT_FOUND":
        raise UploadFailed(f"{describe(response)} (is --url the ingester's base URL?)")
    raise UploadFailed(describe(response))


def transport_error(exc: httpx.TransportError) -> Retryable:
    """A connection that failed, dropped or went silent: worth another attempt."""
    reason = str(exc) or type(exc).__name__
    return Retryable(f"connection failed ({type(exc).__name__}: {reason})")
