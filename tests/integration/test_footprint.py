"""What a process loads that it does not use costs every replica its RSS: the server without
`INGESTER_REDIS_URL` does not load redis-py (about 5 MB), which comes with the first Redis
client (`ingester.storage.redis_gateway.make_client`), and the OpenAPI description's
builders (about 1 MB) load with the first `GET /openapi.json`."""

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
"""


async def test_a_server_without_redis_does_not_load_redis_py() -> None:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", PROBE], capture_stdout=True, capture_stderr=True
        )
    assert done.stdout.decode().split() == ["[]", "False"], done.stderr.decode()[-2000:]


async def test_with_redis_it_is_loaded_by_the_gateway() -> None:
    probe = PROBE.replace(
        "Service(Settings())", "Service(Settings(redis_url='redis://127.0.0.1:1/0'))"
    )
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", probe], capture_stdout=True, capture_stderr=True
        )
    assert "'redis'" in done.stdout.decode(), done.stderr.decode()[-2000:]
