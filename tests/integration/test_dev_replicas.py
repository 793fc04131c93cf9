"""`ingester dev --replicas 2`, as a developer runs it: haproxy on the dev port in front of two
replicas, a local Redis with its replica and three Sentinels; uploads through haproxy land on
the elements (spread over both replicas), tus resumes through it, and Ctrl-C stops every
process of the stack."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import httpx
import trio

from ingester.dev_replicas import ports, servers_up
from tests.integration.test_tus import Tus
from tests.support.client import MultipartUpload, post_upload, random_chunks
from tests.support.haproxy import haproxy_binary
from tests.support.processes import dev_stack, free_port_run

REPLICAS = 2


def replica_of_each_upload(log_dir: Path) -> dict[str, int]:
    """How many uploads each replica's log says it stored."""
    return {
        path.stem: path.read_text(errors="replace").count("event=upload_stored")
        for path in sorted(log_dir.glob("replica-*.log"))
    }


async def listening(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def test_replica_mode_serves_through_haproxy_and_stops_cleanly(tmp_path: Path) -> None:
    haproxy_binary()  # fails the test with the install line if it is missing
    plan = ports(0, REPLICAS)
    port = free_port_run(max(p for group in plan.values() for p in group) + 1)
    data_dir = tmp_path / "dev"
    with trio.fail_after(90):
        async with dev_stack(
            tmp_path, "--port", str(port), "--data-dir", str(data_dir), "--replicas", str(REPLICAS)
        ) as dev:
            process, log, banner, token = dev.process, dev.log, dev.banner, dev.token
            url = f"http://127.0.0.1:{port}"
            assert f"{REPLICAS} replicas behind haproxy" in banner
            assert "redis+sentinel://" in banner
            stats_url = f"http://127.0.0.1:{port + plan['stats'][0]}/stats;csv"
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                stats = (await http.get(stats_url)).text
                assert servers_up(stats) == {"replica-1", "replica-2"}, stats
                # Multipart uploads through haproxy: stored, with the checksum sent.
                stored = []
                for seed in range(6):
                    upload = MultipartUpload(random_chunks(64 * 1024, seed=seed))
                    response = await post_upload(http, url, token, upload)
                    assert response.status_code == 201, response.text
                    assert response.json()["checksum"] == upload.sha256
                    stored.append(response.json())
                # A tus upload whose chunks go wherever haproxy sends them.
                tus = Tus(http, url, token)
                data = b"".join(random_chunks(3 * 256 * 1024, seed=9))
                upload_url = await tus.new(len(data))
                final = await tus.upload(upload_url, data, 256 * 1024)
                file_id = final.headers["Upload-File-Id"]
            for body in stored:
                path = data_dir / "se-edit" / body["storage_filename"]
                assert hashlib.sha256(path.read_bytes()).hexdigest() == body["checksum"]
            tus_files = [
                p
                for p in (data_dir / "se-edit").iterdir()
                if p.name.endswith(".attr.json") and file_id in p.read_text()
            ]
            assert len(tus_files) == 1
            # leastconn over idle replicas spreads sequential requests over both.
            per_replica = replica_of_each_upload(data_dir / "logs")
            assert sum(per_replica.values()) == len(stored) + 1, per_replica
            assert all(count > 0 for count in per_replica.values()), per_replica
            # Ctrl-C reaches the whole foreground process group.
            os.killpg(process.pid, signal.SIGINT)
            await process.exited()
            assert process.returncode == 0, log.read_text()[-2000:]
            leftovers = await trio.run_process(
                ["pgrep", "-f", str(data_dir)], capture_stdout=True, check=False
            )
            # pgrep exits 1 when nothing matches (2 would be a usage error, not a pass).
            assert leftovers.returncode == 1, leftovers.stdout
            # The replicas' command lines do not name the data directory: their ports do.
            for part_port in [port] + [port + p for group in plan.values() for p in group]:
                assert not await listening(part_port), f"port {part_port} still served"
