"""`ingester dev --replicas N`: the dev stack scaled out, every part a real process.

  haproxy            --port          the one URL clients use (deploy/haproxy's configuration)
  se-edit, se-rw     --port + 1, + 2 reference Storage Elements, as in the plain dev stack
  Redis              --port + 3      master (no persistence), replica on + 4, three
                                     Sentinels on + 5 .. + 7 watching service `artstore`
  haproxy stats      --port + 8      /stats: which replicas haproxy sees up
  replicas           --port + 9 ..   N `ingester serve` processes sharing Redis (through
                                     Sentinel) and the spool directory

With `INGESTER_REDIS_URL` set, that Redis is used and none is started. Every child runs in
this process group, so the terminal's Ctrl-C reaches them too; on Ctrl-C (or SIGTERM) each
is sent SIGTERM (replicas drain) and killed if still there after a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Final

import httpx
import trio

from .auth.tokens import generate_keypair, make_token
from .dev_parts import (
    DEV_TOKEN_TTL_S,
    STARTUP_TIMEOUT_S,
    ChildProcess,
    print_banner,
    start_elements,
    wait_answering,
)
from .haproxy_config import DRAIN_DELAY_S, Server, render
from .settings import Settings

SERVICE: Final = "artstore"
SENTINELS: Final = 3
# A failover in about 2-4 s: quick enough to try by hand (kill the master, watch uploads go on).
DOWN_AFTER_MS: Final = 1000
FAILOVER_TIMEOUT_MS: Final = 5000
POLL_S: Final = 0.1


class MissingTool(RuntimeError):
    pass


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MissingTool(
            f"ingester dev --replicas needs {name} (Debian package {package}): `make run` "
            f"installs it as root, or apt-get install {package}"
        )
    return path


def ports(port: int, replicas: int) -> dict[str, list[int]]:
    """Which port each part takes (see the module docstring)."""
    return {
        "elements": [port + 1, port + 2],
        "redis": [port + 3, port + 4],
        "sentinels": [port + 5 + i for i in range(SENTINELS)],
        "stats": [port + 5 + SENTINELS],
        "replicas": [port + 6 + SENTINELS + i for i in range(replicas)],
    }


def server_states(csv: str) -> dict[str, tuple[str, str]]:
    """Each backend server's (status, last check) from haproxy's stats CSV: status `UP`,
    `UP 1/2` (a check failed, still in rotation), `DOWN`, `DOWN 1/2` (coming back), ..."""
    lines = csv.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    header = lines[0][2:].split(",")
    kind, status, check = header.index("type"), header.index("status"), header.index("check_status")
    states = {}
    for line in lines[1:]:
        row = line.split(",")
        # type 2 is a server (0 frontend, 1 backend, 3 listener).
        if len(row) > check and row[kind] == "2":
            states[row[1]] = (row[status], row[check])
    return states


def servers_up(csv: str) -> set[str]:
    """The servers haproxy has checked up, in rotation with a passed last check."""
    return {
        name for name, (status, check) in server_states(csv).items()
        if status == "UP" and check == "L7OK"
    }  # fmt: skip


async def _wait_all_checked_up(stats_url: str, names: list[str]) -> None:
    """Until haproxy has checked every replica up (it starts them half-checked), so the first
    requests already spread over all of them."""
    async with httpx.AsyncClient(trust_env=False) as http:
        with trio.fail_after(STARTUP_TIMEOUT_S):
            while True:
                try:
                    if set(names) <= servers_up((await http.get(stats_url, timeout=1.0)).text):
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(POLL_S)


async def _wait_redis(host: str, port: int, child: ChildProcess, *, sentinel: bool) -> None:
    """Until the server answers (a Sentinel: until it names the master)."""
    command = (
        f"*3\r\n$8\r\nSENTINEL\r\n$23\r\nget-master-addr-by-name\r\n${len(SERVICE)}\r\n{SERVICE}\r\n"
        if sentinel
        else "*1\r\n$4\r\nPING\r\n"
    ).encode()
    with trio.fail_after(STARTUP_TIMEOUT_S):
        while True:
            if child.process is not None and child.process.returncode is not None:
                raise RuntimeError(f"{child.name} exited; see {child.log_path}")
            try:
                with trio.fail_after(1.0):
                    stream = await trio.open_tcp_stream(host, port)
                    async with stream:
                        await stream.send_all(command)
                        answer = await stream.receive_some(1024)
                # A Sentinel that does not know the master yet answers a null array.
                if answer and answer[:1] in (b"+", b"*") and not answer.startswith(b"*-1"):
                    return
            except (OSError, trio.TooSlowError):
                pass
            await trio.sleep(POLL_S)


async def _start(stack: AsyncExitStack, name: str, argv: list[str], data_dir: Path) -> ChildProcess:
    child = ChildProcess(name, argv, data_dir / "logs" / f"{name}.log")
    await child.start()
    stack.push_async_callback(child.stop)
    return child


async def start_redis(stack: AsyncExitStack, host: str, port: int, data_dir: Path) -> str:
    """A master, its replica and three Sentinels; the `redis+sentinel://` URL."""
    redis_server = _tool("redis-server", "redis-server")
    plan = ports(port, 0)
    master_port, replica_port = plan["redis"]
    root = data_dir / "redis"
    for index, node_port in enumerate((master_port, replica_port)):
        directory = root / f"node-{node_port}"
        await trio.Path(directory).mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server, "--port", str(node_port), "--bind", host, "--dir", str(directory),
            "--save", "", "--appendonly", "no",
        ]  # fmt: skip
        if index == 1:
            argv += ["--replicaof", host, str(master_port)]
        child = await _start(stack, f"redis-{node_port}", argv, data_dir)
        await _wait_redis(host, node_port, child, sentinel=False)
    for sentinel_port in plan["sentinels"]:
        directory = root / f"sentinel-{sentinel_port}"
        await trio.Path(directory).mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"
        # Written fresh each time: Sentinel rewrites it with what it learnt, which a new
        # stack (a new master) must not inherit.
        await trio.Path(config).write_text(
            f"sentinel monitor {SERVICE} {host} {master_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
        )
        argv = [
            redis_server, str(config), "--sentinel", "--port", str(sentinel_port),
            "--bind", host, "--dir", str(directory),
        ]  # fmt: skip
        child = await _start(stack, f"sentinel-{sentinel_port}", argv, data_dir)
        await _wait_redis(host, sentinel_port, child, sentinel=True)
    sentinels = ",".join(f"{host}:{p}" for p in plan["sentinels"])
    return f"redis+sentinel://{sentinels}/{SERVICE}"


def _topology(
    servers: list[Server], data_dir: Path, stats: str, redis_url: str, master_port: int | None
) -> list[str]:
    """The banner's lines about the replicas, haproxy and Redis."""
    rel = os.path.relpath(data_dir)
    ours = "" if master_port is None else f" (master on port {master_port})"
    return [
        f"  {len(servers)} replicas behind haproxy: "
        + ", ".join(f"{s.name} on {s.address}" for s in servers)
        + f"; logs under {rel}/logs/",
        f"  haproxy's view of them: http://{stats}/stats",
        f"  Redis: {redis_url}{ours}",
    ]


def replica_env(
    base_env: dict[str, str], *, host: str, port: int, public_key: Path, redis_url: str,
    elements_json: str | None, spool_dir: Path,
) -> dict[str, str]:  # fmt: skip
    """The environment of one replica: the user's, with the stack's own settings on top."""
    env = {k: v for k, v in base_env.items() if k != "INGESTER_AUTH_JWKS_URL"}
    env.update(
        {
            "INGESTER_HOST": host,
            "INGESTER_PORT": str(port),
            "INGESTER_AUTH_PUBLIC_KEY_PATH": str(public_key),
            "INGESTER_REDIS_URL": redis_url,
            "INGESTER_SPOOL_DIR": str(spool_dir),
            "INGESTER_LOG_FORMAT": "text",
            "INGESTER_DOCS_ENABLED": "true",
            "INGESTER_DRAIN_DELAY_S": str(DRAIN_DELAY_S),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if elements_json is not None:
        env["INGESTER_STORAGE_ELEMENTS"] = elements_json
    return env


async def run_dev_replicas(
    host: str, port: int, data_dir: Path, base: Settings, replicas: int
) -> None:
    haproxy = _tool("haproxy", "haproxy")
    plan = ports(port, replicas)
    private_key, public_key = await trio.to_thread.run_sync(generate_keypair, data_dir / "keys")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with AsyncExitStack() as stack:
            elements = await start_elements(stack, host, port, data_dir, public_key)
            redis_url = base.redis_url or await start_redis(stack, host, port, data_dir)
            elements_json = (
                None
                if base.storage_elements
                else json.dumps([e.model_dump(mode="json", exclude_none=True) for e in elements])
            )
            servers: list[Server] = []
            children: list[ChildProcess] = []
            for index, replica_port in enumerate(plan["replicas"], start=1):
                env = replica_env(
                    dict(os.environ),
                    host=host,
                    port=replica_port,
                    public_key=public_key,
                    redis_url=redis_url,
                    elements_json=elements_json,
                    spool_dir=data_dir / "spool",
                )
                child = ChildProcess(
                    f"replica-{index}",
                    [sys.executable, "-m", "ingester", "serve"],
                    data_dir / "logs" / f"replica-{index}.log",
                    env=env,
                )
                await child.start()
                stack.push_async_callback(child.stop)
                children.append(child)
                servers.append(Server(f"replica-{index}", f"{host}:{replica_port}"))
            for child, server in zip(children, servers, strict=True):
                await wait_answering(f"http://{server.address}", child, "/health/ready")
            config = data_dir / "haproxy.cfg"
            stats = f"{host}:{plan['stats'][0]}"
            await trio.Path(config).write_text(render(f"{host}:{port}", servers, stats_bind=stats))
            proxy = await _start(stack, "haproxy", [haproxy, "-db", "-f", str(config)], data_dir)
            url = f"http://{host}:{port}"
            await wait_answering(url, proxy, "/health/ready")
            await _wait_all_checked_up(f"http://{stats}/stats;csv", [s.name for s in servers])

            pem = await trio.Path(private_key).read_bytes()
            token = await trio.to_thread.run_sync(
                lambda: make_token(pem, sub="dev-user", role="user", ttl=DEV_TOKEN_TTL_S)
            )
            topology = _topology(
                servers, data_dir, stats, redis_url, None if base.redis_url else plan["redis"][0]
            )
            print_banner(url, [f"{host}:{port}"], token, data_dir, private_key, topology=topology)
            # The stack runs until the user stops it: no deadline on this wait by design.
            async for _ in signals:
                break
