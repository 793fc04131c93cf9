"""How much request body one connection may hold on its way in, from one total for all.

Between the socket and the upload pipeline a connection holds a socket read in hand,
hypercorn's app queue (`app_queue_size` reads) and the request's body buffer. Big reads save
Python work per byte (a read costs the same on its way through hypercorn, h11, Quart and the
multipart parser, whatever its size), but none of this is in the upload memory budget, and 64
clients reading 1 MiB at a time held about 300 MiB of it (measured: 64 concurrent 16 MiB
uploads, peak RSS 490 MB).

So the read size and the body buffer follow the number of connections with a request
running: each gets an equal part of `total_bytes`, between `MIN_READ` and `max_read` per
read. A few uploads read 1 MiB at a time; 64 read about 200 KiB. Connections waiting for a
request head (idle keep-alive) do not count: they hold nothing.

Pure bookkeeping, shared by the listeners (which count and read) and the request bodies
(which pause at `body_limit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MIN_READ: Final = 64 * 1024
# Reads are whole pages.
_PAGE: Final = 4096


@dataclass
class ReceiveShare:
    # All connections together: reads in hand, queued and buffered.
    total_bytes: int
    # The largest read (INGESTER_SOCKET_READ_SIZE).
    max_read: int
    # hypercorn's app queue, in reads.
    queue_size: int
    # Connections with a request running (their head read, their body not yet).
    busy: int = 0

    def __post_init__(self) -> None:
        if self.total_bytes <= 0 or self.max_read <= 0 or self.queue_size < 1:
            raise ValueError("total_bytes and max_read must be > 0, queue_size >= 1")

    def read_size(self) -> int:
        """The next socket read's size for any connection."""
        per_connection = self.total_bytes // max(1, self.busy)
        # One read in hand, `queue_size` queued, and a body buffer of up to two reads.
        size = per_connection // (self.queue_size + 3) // _PAGE * _PAGE
        return max(min(MIN_READ, self.max_read), min(self.max_read, size))

    def body_limit(self, configured: int) -> int:
        """Where a request body buffer pauses its reader: `configured`, or less when many
        connections share the total."""
        return max(MIN_READ, min(configured, 2 * self.read_size()))

    def started(self) -> None:
        self.busy += 1

    def ended(self) -> None:
        self.busy -= 1
        assert self.busy >= 0, "a request ended that had not started"
