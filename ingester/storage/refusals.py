"""Which answers of Storage Elements are about the request rather than the element. No I/O.

An upload moves on to another element when the failure was the element's (it was unreachable,
timed out, was full, said 5xx, or its own mode refused uploads). It stops when another element
would answer the same:

- **at the first one**: a 4xx other than 408, 429, a mode refusal and FastAPI's `400 "There
  was an error parsing the body"` (the client's file or our request is at fault: malformed,
  refused token, a file id in use). These are `StorageElementRejected` with
  `retryable=False`, decided in `client.raise_for_status`. FastAPI's `400` is the element's
  failure: artStore's element answers it when its temporary disk cannot take a file part,
  before its route runs, and our forms are well-formed by construction.
- **at the second identical one**: a `500` or `501` with the same message, from any element
  (the same one again in a later round included). artStore's element answers
  `500 {"detail": "Failed to create file"}` to whatever its file service cannot store (an
  empty file, an attribute record over its 4 KiB, a user name its file naming refuses), and
  a 500 alone cannot tell that from a broken element. Two alike can: the upload then ends
  at once instead of going round every element for every retry round. 502, 503 and 504 are
  never taken for the request's fault: they say an element or a proxy is unavailable.

The cost is that artStore's full disk, which it also reports as that 500, ends an upload after
two full elements even if a third has room; the prober's capacity figures and the breakers keep
full elements out of the choice before that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ..errors import StorageElementError, StorageElementRejected

# Server errors that may be the request's fault when two elements agree on them.
REPEATABLE_STATUSES: Final = frozenset({500, 501})


def _signature(error: StorageElementError) -> tuple[int, str] | None:
    status = error.upstream_status
    if status not in REPEATABLE_STATUSES:
        return None
    # The message is "<element> answered <status>: <what it said>": compare what it said.
    _, _, said = error.message.partition(f"answered {status}: ")
    return status, said.strip()


def repeated_refusal(failures: Sequence[StorageElementError]) -> StorageElementRejected | None:
    """The error that ends an upload whose last failure repeats an earlier one, else None."""
    if len(failures) < 2:
        return None
    last = _signature(failures[-1])
    if last is None:
        return None
    first = next((f for f in failures[:-1] if _signature(f) == last), None)
    if first is None:
        return None
    status, said = last
    who = (
        f"{first.element_id} refused this file twice alike"
        if first.element_id == failures[-1].element_id
        else f"{first.element_id} and {failures[-1].element_id} refused this file alike"
    )
    return StorageElementRejected(
        f"{who} ({status}: {said or 'no detail'}); not retried on other elements",
        element_id=failures[-1].element_id,
        upstream_status=status,
        retryable=False,
    )
