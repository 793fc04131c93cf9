"""What the C allocator keeps: upload data must not leave the process bigger than it was.

Upload data is allocated in about 1 MiB pieces, many in worker threads (a batch joined for
the element, compressor output, spool reads), and freed on the event loop. Two glibc habits
then keep memory after the uploads are gone:

- each thread that allocates gets an arena of its own, and freed memory goes back to the
  arena it came from, where it stays. Measured: 4 concurrent 32 MiB uploads in a row took
  RSS from 83 to 145 MB after ~20 rounds (127 MB with 2 arenas) and it stayed there; with
  one arena it stays at 82-93 MB. The price is a shared malloc lock, which large
  allocations (about one per MiB) barely touch.
- free memory between live allocations is returned only by `malloc_trim`, so a heap that
  grew under load can stay grown after it. `trim_heap` is called when the uploads stop.

Both are no-ops where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Final

# mallopt's parameter number for the arena limit (glibc's malloc.h).
_M_ARENA_MAX: Final = -8


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    return libc


def use_one_malloc_arena() -> None:
    """Keep every thread's allocations in the main arena. Call before worker threads start."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)


def trim_heap() -> None:
    """Return free heap memory to the system (blocking for up to a few ms: use a thread)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
