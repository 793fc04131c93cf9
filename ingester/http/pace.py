"""A minimum transfer rate for request bodies. No I/O.

nginx has `client_body_timeout`, load balancers a minimum data rate; hypercorn has neither,
so a body sent at a byte a second would hold an upload slot for as long as it likes. The
rule here: in every window of `window_s` seconds spent waiting for the client, at least
`min_bytes` must arrive. Only the time the server waits counts (the clock is "waited"
time): while the server is not reading (a slow Storage Element, backpressure) the client
cannot send and is not at fault. The first window is a grace period: nothing is judged
before `window_s` seconds of waiting.

Arrivals are kept only as far back as needed to sum to `min_bytes`: older ones can never
matter again, so the memory is bounded by `min_bytes` entries (one-byte reads) and is one
entry at any real rate.
"""

from __future__ import annotations

from collections import deque
from typing import Final

# At least this much waiting before anyone is judged, whatever the window.
MIN_WINDOW_S: Final = 0.1


class ClientPace:
    def __init__(self, min_bytes: int, window_s: float) -> None:
        if min_bytes <= 0:
            raise ValueError("min_bytes must be positive")
        self.min_bytes = min_bytes
        self.window_s = max(window_s, MIN_WINDOW_S)
        # Seconds spent waiting for the client so far: the clock arrivals are stamped with.
        self.waited = 0.0
        # (waited when it arrived, bytes), oldest first; sums to >= min_bytes once that
        # much arrived, dropping what is no longer needed.
        self._arrivals: deque[tuple[float, int]] = deque()
        self._total = 0

    def waited_for(self, seconds: float) -> None:
        self.waited += max(seconds, 0.0)

    def arrived(self, size: int) -> None:
        if size <= 0:
            return
        self._arrivals.append((self.waited, size))
        self._total += size
        while self._arrivals and self._total - self._arrivals[0][1] >= self.min_bytes:
            self._total -= self._arrivals.popleft()[1]

    def deadline(self) -> float:
        """The waited time at which the last window would hold fewer than `min_bytes`, if
        nothing more arrives."""
        if self._total < self.min_bytes:
            return self.window_s
        # The oldest kept arrival is the one whose leaving the window drops the sum below.
        return self._arrivals[0][0] + self.window_s

    def wait_left(self) -> float:
        """How much longer the server may wait for the client's next bytes (<= 0: none)."""
        return self.deadline() - self.waited
