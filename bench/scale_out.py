"""Scale-out throughput and Redis calls per upload: 1 and 3 replicas behind haproxy.

    python -m bench.scale_out [--uploads 64] [--size-mib 16] [--replicas 1,3]

The world of tests/chaos/test_scale_out.py (haproxy, Redis master + replica + three
Sentinels, two reference elements, N ingester replicas sharing Redis and the spool), with the
ingester's default leases and janitor intervals. curl is the client: `--uploads` uploads of
`--size-mib` incompressible MiB, all at once, through haproxy.

- aggregate throughput: bytes sent / wall time of the whole batch;
- Redis commands per upload: the master's `INFO commandstats` before and after the batch,
  minus the background rate (lease renewals, janitor rounds, registry reads) measured over
  an idle period of the same length;
- how the uploads spread over the replicas (their `ingester_uploads_total`).

Results go to bench/results/scale_out.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import httpx
import redis

from bench.harness import MIB, clear_data, cpu_count, curl_upload_argv, make_file, run_uploads, save
from ingester.auth.tokens import generate_keypair, make_token
from tests.support.fixtures import KeyPair
from tests.support.scale_out import World, scale_out

FIELDS: Final = ["retention_policy=temporary", "compress=false"]
# The ingester's own defaults, not the chaos tests' short ones.
ENV: Final = {
    "INGESTER_SAGA_LEASE_S": "30",
    "INGESTER_SAGA_JANITOR_INTERVAL_S": "5",
    "INGESTER_TUS_LOCK_TTL_S": "6",
    "INGESTER_SHUTDOWN_GRACE_S": "30",
    "INGESTER_MAX_UPLOADS_PER_USER": "128",
}


# Replication and connection handshakes, and this script's own INFO: not the ingesters' work.
NOT_THE_INGESTERS: Final = frozenset(
    {"replconf", "psync", "sync", "ping", "hello", "info", "client|setinfo", "client|setname"}
)
# Commands a client sends (the rest run inside its scripts): the round trips.
ROUND_TRIPS: Final = frozenset(
    {"evalsha", "eval", "wait", "script|exists", "script|load", "get", "set", "publish"}
)


def command_calls(world: World) -> dict[str, int]:
    port = world.redis.master_port()
    assert port is not None
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if isinstance(value, dict) and name.removeprefix("cmdstat_") not in NOT_THE_INGESTERS
    }


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def uploads_by_replica(world: World) -> dict[str, int]:
    counts = {}
    for index, proc in enumerate(world.replicas):
        assert proc is not None
        text = httpx.get(proc.url + "/metrics", timeout=5).text
        match = re.search(r'^ingester_uploads_total\{outcome="success"\} ([0-9.e+]+)$', text, re.M)
        counts[world.name(index)] = int(float(match.group(1))) if match else 0
    return counts


def one(
    replicas: int, uploads: int, size: int, root: Path, keys: KeyPair, token: str
) -> dict[str, Any]:
    files = [make_file(root / f"file-{i}.bin", size, compressible=False) for i in range(uploads)]
    with scale_out(root / f"world-{replicas}", keys, replicas=replicas, **ENV) as world:
        url = world.url + "/api/v1/files/upload"
        argvs = [curl_upload_argv(url, token, path, FIELDS) for path in files]
        # Warm-up: connections, imports, the first registry probes.
        run_uploads(argvs[:4])
        for se in world.elements:
            clear_data(se)
        before = command_calls(world)
        wall_s, results = run_uploads(argvs)
        during = delta(command_calls(world), before)
        # The background's calls over as long, with no uploads.
        idle_before = command_calls(world)
        time.sleep(wall_s)
        idle = delta(command_calls(world), idle_before)
        statuses = sorted({status for status, _ in results})
        spread = uploads_by_replica(world)
    upload_calls = {k: v - idle.get(k, 0) for k, v in during.items()}
    total = sum(during.values())
    background = sum(idle.values())
    return {
        "replicas": replicas,
        "uploads": uploads,
        "size_mib": size / MIB,
        "statuses": statuses,
        "wall_s": round(wall_s, 2),
        "throughput_mib_s": round(uploads * size / MIB / wall_s, 1),
        "p50_upload_s": round(sorted(t for _, t in results)[len(results) // 2], 2),
        "redis_calls_during": total,
        "redis_calls_background": background,
        "redis_calls_per_upload": round((total - background) / uploads, 1),
        "redis_round_trips_per_upload": round(
            sum(v for k, v in upload_calls.items() if k in ROUND_TRIPS) / uploads, 2
        ),
        "redis_calls_per_upload_by_command": {
            k: round(v / uploads, 2) for k, v in sorted(upload_calls.items()) if v > 0
        },
        "uploads_by_replica_incl_warmup": spread,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_out")
    parser.add_argument("--uploads", type=int, default=64)
    parser.add_argument("--size-mib", type=int, default=16)
    parser.add_argument("--replicas", default="1,3")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        root = Path(tmp)
        private, public = generate_keypair(root / "keys")
        keys = KeyPair(private_path=private, public_path=public, private_pem=private.read_bytes())
        token = make_token(keys.private_pem, sub="bench", role="user", ttl=3600)
        for replicas in (int(n) for n in args.replicas.split(",")):
            row = one(replicas, args.uploads, args.size_mib * MIB, root, keys, token)
            rows.append(row)
            print(row, flush=True)
    results = {"cpus": cpu_count(), "load_average": os.getloadavg(), "runs": rows}
    path = save(results, "scale_out")
    print(
        f"\n{cpu_count()} CPUs; {args.uploads} concurrent uploads of {args.size_mib} MiB via haproxy"
    )
    print(
        "| replicas | throughput | wall | p50 upload | Redis commands per upload | round trips per upload | by command | spread |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        by = ", ".join(f"{k} {v}" for k, v in row["redis_calls_per_upload_by_command"].items())
        print(
            f"| {row['replicas']} | {row['throughput_mib_s']} MiB/s | {row['wall_s']} s | "
            f"{row['p50_upload_s']} s | {row['redis_calls_per_upload']} | "
            f"{row['redis_round_trips_per_upload']} | {by} | "
            f"{row['uploads_by_replica_incl_warmup']} |"
        )
    print(f"(results in {path}; load average at the end {os.getloadavg()})")


if __name__ == "__main__":
    main()
