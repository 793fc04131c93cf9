"""Progress: a bar with bytes, rate and ETA on a terminal (tqdm), nothing otherwise.

Notes (a retry, a resume) are lines: printed above the bar on a terminal, to stderr when
there is no bar, so a log or a pipe gets them without control characters.
"""

from __future__ import annotations

import os
import sys
from typing import Final, Never, Protocol, TextIO

from tqdm import tqdm

FALLBACK_WIDTH: Final = 80
FALLBACK_HEIGHT: Final = 24


class Progress(Protocol):
    def start(self, name: str, total: int, done: int) -> None: ...

    def update(self, done: int) -> None: ...

    def note(self, line: str) -> None: ...

    def storing(self) -> None:
        """Every byte is sent; the server is storing the file before it answers."""

    def finish(self) -> None: ...


class NoProgress:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def start(self, name: str, total: int, done: int) -> None:
        pass

    def update(self, done: int) -> None:
        pass

    def note(self, line: str) -> None:
        print(line, file=self._stream or sys.stderr, flush=True)

    def storing(self) -> None:
        pass

    def finish(self) -> None:
        pass


class BarProgress:
    """One bar per file, erased when the file is done (its result line replaces it)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._bar: tqdm[Never] | None = None

    def start(self, name: str, total: int, done: int) -> None:
        self.finish()
        # A terminal that reports no size (a bare pty) would get no bar at all.
        try:
            width, height = os.get_terminal_size(self._stream.fileno())
        except (OSError, ValueError):
            width, height = 0, 0
        self._bar = tqdm(
            total=total,
            initial=done,
            desc=name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=self._stream,
            leave=False,
            dynamic_ncols=width > 0,
            ncols=None if width > 0 else FALLBACK_WIDTH,
            nrows=height if height > 0 else FALLBACK_HEIGHT,
            mininterval=0.2,
            smoothing=0.1,
        )

    def update(self, done: int) -> None:
        if self._bar is not None:
            # Negative after a failure: the bar goes back to what the server has.
            self._bar.update(done - self._bar.n)

    def note(self, line: str) -> None:
        tqdm.write(line, file=self._stream)

    def storing(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str("storing")

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
