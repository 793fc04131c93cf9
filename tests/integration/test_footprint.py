"""What a process loads that it does not use costs every replica its RSS: the server without
`INGESTER_REDIS_URL` does not load redis-py (about 5 MB), which comes with the first Redis
client (`ingester.storage.redis_gateway.make_client`), and the OpenAPI description's
builders (about 1 MB) load with the first `GET /openapi.json`. Nor does it load a terminal UI
(httpx's command-line client brings rich and pygments, 3.3 MB, wherever they are installed,
as in the development environment the benchmarks run in)."""

from __future__ import annotations

import sys

import trio

PROBE = """
import sys
import ingester.app_main
from ingester.service import Service
from ingester.settings import Settings
Service(Settings())
print(sorted(name for name in sys.modules if name == "redis" or name.startswith("redis.")))
print("ingester.http.openapi" in sys.modules)
print(sorted(name for name in ("rich", "pygments", "tqdm") if name in sys.modules))
"""


async def test_a_server_loads_no_redis_py_without_redis_and_no_terminal_ui() -> None:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", PROBE], capture_stdout=True, capture_stderr=True
        )
    assert done.stdout.decode().split() == ["[]", "False", "[]"], done.stderr.decode()[-2000:]


async def test_with_redis_it_is_loaded_by_the_gateway() -> None:
    probe = PROBE.replace(
        "Service(Settings())", "Service(Settings(redis_url='redis://127.0.0.1:1/0'))"
    )
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", probe], capture_stdout=True, capture_stderr=True
        )
    assert "'redis'" in done.stdout.decode(), done.stderr.decode()[-2000:]


ALLOCATOR_PROBE = """
import resource
from ingester.allocator import TRIM_THRESHOLD, configure_malloc, trim_heap

MIB = 1 << 20
PAGE = resource.getpagesize()

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE

configure_malloc()
# The data path's pattern: a read of 1 MiB, a batch joined from it, both freed.
for _ in range(8):
    read = b"x" * MIB
    del read
before = faults()
for _ in range(256):
    read = b"x" * MIB
    batch = read + b"y"
    del read, batch
print((faults() - before) * PAGE / (256 * 2 * MIB))
# A burst that leaves less than the threshold free at the heap's top: kept until the idle
# trim, which gives it back.
held = [b"x" * MIB for _ in range(TRIM_THRESHOLD // MIB - 4)]
del held
freed = rss()
trim_heap()
print((freed - rss()) / MIB, TRIM_THRESHOLD // MIB - 4)
"""


async def test_upload_sized_blocks_reuse_their_pages_and_an_idle_trim_returns_them() -> None:
    """glibc hands the heap's top back past its trim threshold (128 KiB unless set), so a
    MiB allocated and freed there was faulted in again on each use; `configure_malloc`
    keeps it, and `trim_heap` still returns it once uploads stop (ingester.allocator)."""
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", ALLOCATOR_PROBE], capture_stdout=True, capture_stderr=True
        )
    refaulted, returned_mib, held_mib = (float(v) for v in done.stdout.decode().split())
    # The share of the allocated bytes whose pages were faulted in again: ~1 before.
    assert refaulted < 0.05, done.stdout.decode()
    assert returned_mib > held_mib - 2, done.stdout.decode()
