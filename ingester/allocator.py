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
- glibc serves blocks above its mmap threshold with a mapping of their own, returned to the
  system on free, but it raises that threshold to the size of each such block freed (up
  to 32 MiB). After the first brotli encoder (a ring buffer and hash tables of several
  MiB) is freed, every later one lands in the heap, among small long-lived blocks that
  `malloc_trim` cannot move: the heap stays fragmented. Measured: 160 sequential 4 MiB
  brotli uploads took RSS from 82 to 110 MB and back to 88; with the threshold fixed at
  2 MiB it stays at 82-84. A fixed threshold (which also stops the raising) keeps those
  blocks apart; upload data moves in pieces of about 1 MiB, below it, so no page of the
  data path pays for a fresh mapping.
- glibc gives the top of the heap back to the system whenever more than its trim threshold
  is free there, and fixing the mmap threshold leaves that threshold at its 128 KiB
  default (it is raised with the mmap threshold only while that one is dynamic). Upload
  data is allocated and freed a MiB at a time at the heap's top, so nearly every piece was
  handed back and faulted in again. The threshold is set above what an upload churns
  through there (reads of up to 1 MiB, the batch joined from them, its chunked frame, the
  frames queued: about 5 MiB; a synthetic run of that pattern faulted 180 pages per MiB at
  128 KiB, 119 at 4 MiB, 14 at 8 MiB, 1 at 16 MiB), and not far above, since what it keeps
  stays resident until the next idle trim (`bench.tus` peak RSS in a new process: 91.5 MB
  at 128 KiB, 94.9 at 8 MiB, 95.5 at 16 MiB, 98.2 at 64 MiB). Measured, 256 MiB file-only
  uploads alternating between two ingesters, five rounds: 36.3 page faults per MiB and
  2.28 CPU-s/GiB (medians) at 128 KiB, 0.1 and 2.24 at 16 MiB. Memory after a burst still
  goes back: `trim_when_idle` calls `malloc_trim`, which ignores the threshold.

Both are no-ops where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from typing import Any, Final

import trio

# mallopt's parameter numbers (glibc's malloc.h).
_M_ARENA_MAX: Final = -8
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
# Blocks this large or larger get mappings of their own (see above).
MMAP_THRESHOLD: Final = 2 * 1024 * 1024
# Free memory the top of the heap keeps between idle trims (see above).
TRIM_THRESHOLD: Final = 16 * 1024 * 1024


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


def configure_malloc() -> None:
    """Keep every thread's allocations in the main arena, blocks of `MMAP_THRESHOLD` or
    more out of the heap, and up to `TRIM_THRESHOLD` of free memory at the heap's top
    until the next idle trim. Call before worker threads start."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def trim_heap() -> None:
    """Return free heap memory to the system (blocking for up to a few ms: use a thread)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# How often to look whether a spell of uploads ended (then freed memory goes back).
TRIM_INTERVAL_S: Final = 5.0


async def trim_when_idle(
    busy: Callable[[], bool],
    served: Callable[[], int],
    interval_s: float = TRIM_INTERVAL_S,
    trim: Callable[[], None] = trim_heap,
    trimmed: Callable[[], None] = lambda: None,
) -> None:
    """After a spell of work (`served()` moved since the last trim), once nothing is `busy()`,
    give freed heap memory back: a process that served a burst does not stay its size.
    `trimmed` is told of each trim (a metric).

    First a full garbage collection: failed attempts leave reference cycles (httpx
    requests and responses, exceptions with their frames) that hold buffers until the
    collector's next full pass, which may be far off once uploads stop. Measured in the
    soak (60 uploads, element kills): RSS settled 11-31 MiB above the warm-up without
    it, 0.6 MiB with it. It runs on the event loop (its finalizers must run here), only
    when idle; start-up's objects are frozen out of its scan (app_main)."""
    seen = served()
    while True:
        await trio.sleep(interval_s)
        if not busy() and served() != seen:
            seen = served()
            gc.collect()
            await trio.to_thread.run_sync(trim)
            trimmed()
