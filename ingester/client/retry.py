"""Backoff between attempts: exponential with jitter, reset whenever bytes moved forward.

A long upload over a flaky link may lose its connection many times; what ends it is a run
of failures with no progress in between, not their total.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Final

BASE_S: Final = 0.5
CAP_S: Final = 15.0
# About 25 s of trying with no byte accepted: a restarting server comes back within it; a
# wrong URL or a server that is down does not keep the user waiting for minutes.
MAX_FAILURES: Final = 6
# A Retry-After longer than this is not waited for in full (the server's estimate for a
# crowd of clients; one client's retry costs it little).
RETRY_AFTER_CAP_S: Final = 30.0


@dataclass
class Backoff:
    base_s: float = BASE_S
    cap_s: float = CAP_S
    max_failures: int = MAX_FAILURES
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def progressed(self) -> None:
        """Bytes were accepted since the last failure: start counting afresh."""
        self.failures = 0

    def next_delay(self, retry_after: float | None = None) -> float | None:
        """The wait before the next attempt, or None once the failures ran out.

        Half the exponential step plus a random half ("equal jitter"): retries of many
        clients spread out, and none comes back at once."""
        self.failures += 1
        if self.failures > self.max_failures:
            return None
        step = min(self.cap_s, self.base_s * (1 << (self.failures - 1)))
        delay = step / 2 + self.rng.uniform(0, step / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_CAP_S))
        return delay
