"""Byte buffers on their way to a file or a socket, and the one rule for sending many at once.

`os.pwritev` (the spool, tus data files) and `socket.sendmsg` (element bodies,
`ingester.storage.vectored`) take a list of buffers, at most `IOV_MAX` per call, and may take
fewer bytes than given: `remaining` is what is left for the next call. No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

Buffer = bytes | memoryview

# Buffers one `pwritev` or `sendmsg` takes at most (Linux's UIO_MAXIOV: more is EMSGSIZE or
# EINVAL, and nothing is written).
IOV_MAX: Final = 1024


def remaining(parts: Sequence[Buffer], done: int) -> list[memoryview]:
    """What is left of `parts` once their first `done` bytes went out; empty parts dropped."""
    views: list[memoryview] = []
    for part in parts:
        view = memoryview(part)
        if done >= len(view):
            done -= len(view)
            continue
        views.append(view[done:] if done else view)
        done = 0
    return views
