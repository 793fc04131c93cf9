"""An upload's result, recorded in the same atomic step as its saga's settle.

A client that retries (an `Idempotency-Key` repeat, a tus client's final `PATCH` sent again)
finds the first attempt's result in a record of its own: the idempotency entry, the tus
upload's `done` state. If the saga settled (the copy is kept) and that record were written
after, in a second step, an ingester killed between the two, or a Redis failover losing the
second write, would leave a stored file that no retry knows of: the retry stores it again.
So the owner of the result hands the saga a `ResultCommit`, and with Redis the saga writes
the result in the Lua script that settles it (then `WAIT`s for a replica): both or neither.

A store that is not Redis (this process's memory) has no second process to race: the result
is written right after the settle, as before.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..errors import IngesterError


@dataclass(frozen=True, slots=True)
class ResultWrite:
    """One Redis string set in the settle's script, with its absolute expiry (unix ms).

    `guard`: (key, value) that must hold (`GET key == value`) for the settle and this write
    to happen; otherwise neither does (the settle script answers "refused"). `index`: (sorted
    set, score, member) added with the write."""

    key: str
    value: str
    expire_at_ms: int
    guard: tuple[str, str] | None = None
    index: tuple[str, float, str] | None = None


class ResultRefused(Exception):
    """The result's guard did not hold: nothing was settled or written."""


class ResultUnknown(Exception):
    """The result's store could not be asked."""


class ResultCommit(ABC):
    """How one upload's result is recorded. Built by the result's owner (HTTP idempotency,
    tus), used once by the saga when the upload succeeds."""

    def __init__(self) -> None:
        # Whether the result was recorded, atomically or right after the settle.
        self.applied = False

    def mark_applied(self) -> None:
        self.applied = True

    @abstractmethod
    def redis_write(self, result: dict[str, Any]) -> ResultWrite | None:
        """The write for the settle's script; None when the result does not live in Redis."""

    @abstractmethod
    async def write(self, result: dict[str, Any]) -> None:
        """Record the result on its own (after the settle). Never raises: logs a failure."""

    @abstractmethod
    def refusal(self) -> IngesterError:
        """The error the upload fails with when the guard does not hold."""

    @abstractmethod
    async def recorded(self, result: dict[str, Any]) -> bool:
        """Whether the store holds `result` (after a settle whose answer was lost); raises
        `ResultUnknown` when the store cannot be asked."""
