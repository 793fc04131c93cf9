"""Real containers for the deploy tests: podman, on the images `make image` builds.

`make image` (deploy/image/build.sh) installs what it needs, makes the debootstrapped base
(cached by its recipe) and builds both images; the session's first container test runs it
once. Podman runs with deploy/image/containers.conf (CONTAINERS_CONF), as the scripts do.
A missing tool or a failed build fails the test with the tail of its output: never a skip.

Every container and volume a test makes is named after it and removed whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from tests.deploy.files import IMAGE_NAME, REPO
from tests.support.processes import child_env, free_port

IMAGE_DIR: Final = REPO / "deploy" / "image"
# This checkout's own tags: other checkouts on the machine (podman's store is shared) may
# build theirs at the same time, from other code.
TEST_TAG: Final = "test-" + hashlib.sha256(str(REPO).encode()).hexdigest()[:10]
# A fresh machine: apt-get install, debootstrap and upgrade (2-4 min here), both builds from
# scratch (1-2 min). A cached base and layers make it seconds.
BUILD_TIMEOUT_S: Final = 1800.0
# One podman command (run, exec, rm): seconds, more on a loaded machine.
PODMAN_TIMEOUT_S: Final = 120.0
# Python, the app and its imports inside the container.
STARTUP_TIMEOUT_S: Final = 60.0
OUTPUT_TAIL_LINES: Final = 60


def podman_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment (no `INGESTER_*`) with this machine's podman settings."""
    env = child_env(overrides)
    env.setdefault("CONTAINERS_CONF", str(IMAGE_DIR / "containers.conf"))
    return env


def _text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


def tail(text: str, lines: int = OUTPUT_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class Images:
    ingester: str
    redis: str


def build_images() -> Images:
    """`make image`, with the names the tests use."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed: apt-get install --no-install-recommends make")
    images = Images(ingester=f"{IMAGE_NAME}:{TEST_TAG}", redis=f"artstore-redis:{TEST_TAG}")
    argv = [make, "--no-print-directory", "image", f"IMAGE={images.ingester}"]
    argv.append(f"REDIS_IMAGE={images.redis}")
    try:
        result = subprocess.run(
            argv,
            cwd=REPO,
            env=podman_env(),
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        pytest.fail(f"make image took more than {BUILD_TIMEOUT_S:.0f} s:\n{tail(output)}")
    if result.returncode != 0:
        pytest.fail(
            f"make image failed ({result.returncode}):\n{tail(result.stdout + result.stderr)}"
        )
    return images


def podman_sync(
    *args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """A podman command from a sync fixture; a failure shows its output."""
    podman = shutil.which("podman")
    if podman is None:
        pytest.fail("podman is not installed: make image installs it (deploy/image/deps.sh)")
    result = subprocess.run(
        [podman, *args],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {result.returncode}:\n{tail(result.stderr)}"
        )
    return result


@dataclass(frozen=True)
class Finished:
    """A command's end, decoded."""

    returncode: int
    stdout: str
    stderr: str

    def output_tail(self) -> str:
        """The reason first (stderr's last line, where stack.sh says what failed), then the
        tails of stderr and stdout: a CI log that cuts a long message keeps its start."""
        errors = self.stderr.strip().splitlines()
        reason = errors[-1] if errors else "(nothing on stderr)"
        return (
            f"{reason}\n--- stderr, last lines ---\n{tail(self.stderr)}"
            f"\n--- stdout, last lines ---\n{tail(self.stdout)}"
        )


async def run_command(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, check: bool = True
) -> Finished:
    """A command from a test body (under the test's `fail_after`)."""
    result = await trio.run_process(
        list(argv),
        env=dict(env) if env is not None else podman_env(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    finished = Finished(
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )
    if check and finished.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {finished.returncode}:\n{finished.output_tail()}"
        )
    return finished


async def podman(*args: str, check: bool = True) -> Finished:
    path = shutil.which("podman")
    assert path is not None, "podman is not installed: make image installs it"
    return await run_command([path, *args], check=check)


async def inspect(name: str) -> dict[str, Any]:
    (document,) = json.loads((await podman("inspect", name)).stdout)
    assert isinstance(document, dict)
    return document


# --- the ingester image, run as the Kubernetes manifest runs it -----------------------------

# deploy/k8s/deployment.yaml and configmap.yaml: where the key and the spool are mounted.
KEY_DIR: Final = "/etc/ingester/jwt"
SPOOL_DIR: Final = "/var/lib/ingester/spool"


@dataclass(frozen=True)
class Container:
    name: str
    url: str
    spool_volume: str

    def logs(self) -> str:
        result = podman_sync("logs", self.name, check=False)
        return tail(result.stdout + result.stderr)


def _wait_live(name: str, url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(trust_env=False) as http:
        while time.monotonic() < deadline:
            state = podman_sync("inspect", "--format", "{{.State.Running}}", name).stdout
            if state.strip() != "true":
                logs = podman_sync("logs", name, check=False)
                raise AssertionError(f"{name} exited at start:\n{tail(logs.stderr)}")
            try:
                if http.get(url + "/health/live", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    logs = podman_sync("logs", name, check=False)
    raise AssertionError(f"{name} did not answer in {STARTUP_TIMEOUT_S} s:\n{tail(logs.stderr)}")


@contextmanager
def ingester_container(
    image: str,
    *,
    name: str,
    root: Path,
    public_key: Path,
    elements: list[dict[str, object]],
    env: Mapping[str, str] | None = None,
) -> Iterator[Container]:
    """`ingester serve` in the image as deploy/k8s runs it: read-only root file system with
    a tmpfs on /tmp and a volume on the spool, every capability dropped, no privilege
    escalation, the key in a read-only directory. On the host's network, bound to loopback,
    so it reaches the reference elements the test runs on the host."""
    port = free_port()
    key_dir = root / "jwt"
    key_dir.mkdir(parents=True)
    shutil.copyfile(public_key, key_dir / "public.pem")
    key_dir.chmod(0o755)
    (key_dir / "public.pem").chmod(0o644)  # the image's user (10001) reads it
    spool_volume = f"{name}-spool"
    settings = {
        "INGESTER_HOST": "127.0.0.1",
        "INGESTER_PORT": str(port),
        "INGESTER_AUTH_PUBLIC_KEY_PATH": f"{KEY_DIR}/public.pem",
        "INGESTER_STORAGE_ELEMENTS": json.dumps(elements),
        "INGESTER_LOG_FORMAT": "json",
        "INGESTER_SE_PROBE_INTERVAL_S": "0.5",
        **(env or {}),
    }
    argv = [
        "run", "--detach", "--name", name, "--network", "host",
        "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--volume", f"{spool_volume}:{SPOOL_DIR}",
        "--volume", f"{key_dir}:{KEY_DIR}:ro",
    ]  # fmt: skip
    for key, value in settings.items():
        argv += ["--env", f"{key}={value}"]
    podman_sync("volume", "create", spool_volume)
    try:
        podman_sync(*argv, image)
        url = f"http://127.0.0.1:{port}"
        _wait_live(name, url)
        yield Container(name, url, spool_volume)
    finally:
        podman_sync("rm", "--force", "--volumes", "--time", "0", name, check=False)
        podman_sync("volume", "rm", "--force", spool_volume, check=False)


def unique_name(prefix: str) -> str:
    """Container and project names of this test run (several runs may share the machine)."""
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
