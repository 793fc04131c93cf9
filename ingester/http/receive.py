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

A part that shrinks does not shrink what a connection already holds: the first of 64
uploads starting together read 1 MiB at a time while they were few, and those reads waited
in queues while the others came (measured: 151 MB of received data alive at the peak, for
a share of 64 MiB). So each connection's `Intake` counts its bytes received and not yet
handed to its handler, and a read is also no larger than what is left of the connection's
part and of the total. A read is never smaller than `MIN_READ`, so no connection waits for
another's handler: past the total, each connection still fills its queue and body buffer,
but with floor-sized reads (measured at the 64-upload peak: 105 MB of received data alive,
against 151 MB before).

Pure bookkeeping, shared by the listeners (which count and read) and the request bodies
(which pause at `body_limit` and say what they handed out). An intake is also how a request
reaches its connection's `ContinueGate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Protocol

MIN_READ: Final = 64 * 1024
# Reads are whole pages.
_PAGE: Final = 4096


class ContinueGate(Protocol):
    """A request's `Expect: 100-continue`, left to its handler: the `100` goes out when the
    handler first waits for the body, so a request refused before that (a bad token, too
    large a `Content-Length`) costs its client no body at all."""

    async def open(self) -> None:
        """Send `100 Continue` if the client waits for it (once per request)."""

    def shut(self) -> bool:
        """Whether the client still waits for a `100` it was not sent (then it sends no
        body, and there is none to drain)."""


@dataclass(eq=False)
class Intake:
    """One connection's request bytes received and not yet handed to its handler (in the
    server's parser, hypercorn's app queue and the body buffer)."""

    held: int = 0
    # Set by the server when its connection leaves `Expect: 100-continue` to the handler.
    continue_gate: ContinueGate | None = None


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
    # What all intakes hold.
    held: int = 0
    # Open connections' intakes, by (client address, server address): how a request body,
    # which knows its ASGI scope, finds its connection's.
    _intakes: dict[tuple[object, object], Intake] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.total_bytes <= 0 or self.max_read <= 0 or self.queue_size < 1:
            raise ValueError("total_bytes and max_read must be > 0, queue_size >= 1")

    def read_size(self, intake: Intake | None = None) -> int:
        """The next socket read's size: for `intake`'s connection, or any connection."""
        per_connection = self.total_bytes // max(1, self.busy)
        # One read in hand, `queue_size` queued, and a body buffer of up to two reads.
        size = per_connection // (self.queue_size + 3)
        if intake is not None:
            # No more than what is left of this connection's part, and of the total.
            size = min(size, per_connection - intake.held, self.total_bytes - self.held)
        size = size // _PAGE * _PAGE
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

    # --- what each connection holds ------------------------------------------------------

    def open(self, client: object, server: object) -> Intake | None:
        """The intake of a connection from `client` to `server` (the addresses hypercorn
        also puts in each request's ASGI scope), from its accept to its `close`. None without
        a client address, as on a Unix socket: requests could not tell such connections
        apart, so they size their reads as before the byte count."""
        if client is None:
            return None
        intake = self._intakes[(client, server)] = Intake()
        return intake

    def intake_for(self, client: object, server: object) -> Intake | None:
        """The intake a request from `client` to `server` counts in (its scope's addresses)."""
        return None if client is None else self._intakes.get((client, server))

    def received(self, intake: Intake, size: int) -> None:
        intake.held += size
        self.held += size

    def taken(self, intake: Intake, size: int) -> None:
        """`size` bytes left for the handler (or were dropped by the body)."""
        # Never below zero: the read that carried the head (and perhaps the body's start)
        # was not counted.
        size = min(size, intake.held)
        intake.held -= size
        self.held -= size

    def settle(self, intake: Intake) -> None:
        """The request is over: what it left unread (a refused body's queue, its head) is
        gone with it."""
        self.taken(intake, intake.held)

    def close(self, client: object, server: object, intake: Intake) -> None:
        self.settle(intake)
        if self._intakes.get((client, server)) is intake:
            del self._intakes[(client, server)]
