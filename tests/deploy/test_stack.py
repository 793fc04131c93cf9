"""The try-it stack for real: deploy/compose.yml brought up with Debian's podman-compose by
deploy/image/stack.sh (what deploy/README.md tells a person to run), on the images `make
image` builds. An upload through the published port lands on the element its retention
asks for, byte for byte on the element's volume; every healthcheck of the file passes under
podman; `down -v` leaves no container, volume or network of the project behind.

The ingester's port is published on 127.0.0.1 only; the other containers talk on the
project's own podman network. The test body runs under `trio.fail_after`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

import httpx
import trio

from tests.deploy.containers import (
    IMAGE_DIR,
    Finished,
    Images,
    inspect,
    podman,
    podman_env,
    run_command,
    unique_name,
)
from tests.deploy.files import STACK_COMPOSE, load_yaml
from tests.support.chaos import Stored
from tests.support.client import MIB, MultipartUpload, post_upload, random_chunks
from tests.support.processes import free_port

STACK: Final = IMAGE_DIR / "stack.sh"
# Up: podman-compose pauses a second per container, and each wait polls; down: the
# ingester's drain. Minutes only when the machine is very loaded.
STACK_TIMEOUT_S: Final = 300.0
# The services `stack.sh up` starts: the ingester and what it depends on, not the
# observability profile (Prometheus and Grafana images cannot be had here).
SERVICES: Final = ("keygen", "redis", "se-edit", "se-rw", "registry-init", "ingester")
ONE_SHOT: Final = ("keygen", "registry-init")
DATA_DIR: Final = "/var/lib/ingester/data"


class StackRun:
    """`stack.sh` for one compose project of this test run."""

    def __init__(self, images: Images) -> None:
        self.project = unique_name("artstore-test")
        self.port = free_port()
        self.env = podman_env(
            {
                "STACK_PROJECT": self.project,
                "ARTSTORE_INGESTER_IMAGE": images.ingester,
                "ARTSTORE_REDIS_IMAGE": images.redis,
                "ARTSTORE_INGESTER_PUBLISHED_PORT": f"127.0.0.1:{self.port}",
                "STACK_WAIT_S": "120",
            }
        )
        self.url = f"http://127.0.0.1:{self.port}"

    async def run(self, *args: str, check: bool = True) -> Finished:
        return await run_command([str(STACK), *args], env=self.env, check=check)

    async def internal_readiness(self) -> dict[str, Any]:
        """The ingester's readiness with its detail, from inside its container."""
        fetch = (
            "import urllib.request as r; print(r.build_opener(r.ProxyHandler({}))"
            ".open('http://127.0.0.1:8021/health/ready', timeout=10).read().decode())"
        )
        found = await podman("exec", self.container("ingester"), "python", "-c", fetch)
        detail = json.loads(found.stdout)
        assert isinstance(detail, dict), detail
        return detail

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def volume(self, name: str) -> str:
        return f"{self.project}_{name}"

    async def leftovers(self) -> dict[str, list[str]]:
        label = f"label=io.podman.compose.project={self.project}"
        containers = await podman("ps", "--all", "--quiet", "--filter", label)
        volumes = await podman("volume", "ls", "--quiet", "--filter", label)
        network = await podman("network", "exists", f"{self.project}_default", check=False)
        return {
            "containers": containers.stdout.split(),
            "volumes": volumes.stdout.split(),
            "networks": [f"{self.project}_default"] if network.returncode == 0 else [],
        }


async def stored_on_volume(
    run: StackRun, volume: str, stored: Stored
) -> tuple[str, dict[str, Any]]:
    """The sha256 of the stored data file and its attr.json, read from the element's volume."""
    mountpoint = (await podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume)).stdout
    data_dir = trio.Path(mountpoint.strip())
    # The reference element names its stored file in its answer.
    name = stored.storage_filename
    assert name is not None, stored
    data = await (data_dir / name).read_bytes()
    attributes = json.loads(await (data_dir / (name + ".attr.json")).read_text())
    assert isinstance(attributes, dict)
    return hashlib.sha256(data).hexdigest(), attributes


async def test_the_try_it_stack_runs_with_podman_compose_and_stores_uploads(
    images: Images,
) -> None:
    run = StackRun(images)
    down: Finished | None = None
    with trio.fail_after(STACK_TIMEOUT_S):
        try:
            await run.run("up")
            token = (await run.run("token", "--sub", "alice")).stdout.strip()
            assert token.count(".") == 2, token

            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                ready = await http.get(run.url + "/health/ready")
                assert ready.status_code == 200, ready.text
                # The detail is on the internal listener (8021), which is not published.
                detail = await run.internal_readiness()
                assert detail["registry_source"] == "redis", detail
                assert sorted(detail["writable_storage_elements"]) == ["se-edit", "se-rw"]
                uploads: dict[str, Stored] = {}
                for seed, (retention, element) in enumerate(
                    [("temporary", "se-edit"), ("permanent", "se-rw")]
                ):
                    body = MultipartUpload(
                        random_chunks(2 * MIB + seed * 4097, seed=160 + seed),
                        fields=[("retention_policy", retention)],
                        filename=f"{retention}.bin",
                    )
                    response = await post_upload(http, run.url, token, body)
                    stored = Stored.of(response, body)
                    assert stored.element_id == element, response.text
                    uploads[element] = stored

            # Byte for byte on each element's volume, with the element's own record.
            for element, stored in uploads.items():
                sha256, attributes = await stored_on_volume(
                    run, run.volume(f"{element}-data"), stored
                )
                assert sha256 == stored.sha256, element
                assert attributes["file_id"] == stored.file_id
                assert attributes["checksum"] == stored.sha256
                assert attributes["file_size"] == stored.size

            # Every long-running service's healthcheck, as the compose file declares it.
            compose = load_yaml(STACK_COMPOSE)["services"]
            for service in SERVICES:
                state = await inspect(run.container(service))
                if service in ONE_SHOT:
                    assert state["State"]["Status"] == "exited", service
                    assert state["State"]["ExitCode"] == 0, service
                    continue
                assert state["State"]["Running"] is True, service
                assert "healthcheck" in compose[service], service
                check = await podman("healthcheck", "run", run.container(service), check=False)
                assert check.returncode == 0, (service, check.output_tail())
            ingester = await inspect(run.container("ingester"))
            assert ingester["HostConfig"]["ReadonlyRootfs"] is True
            assert ingester["Config"]["User"] == "10001:10001"

            down = await run.run("down", "-v")
        finally:
            if down is None:
                with trio.CancelScope(shield=True), trio.move_on_after(120):
                    await run.run("down", "-v", check=False)
        assert await run.leftovers() == {"containers": [], "volumes": [], "networks": []}


def test_stack_script_names_the_services_the_test_expects() -> None:
    """stack.sh starts keygen and redis, then the ingester with its dependencies: together
    every service of the file but the observability profile's."""
    services = load_yaml(STACK_COMPOSE)["services"]
    outside_profiles = {name for name, service in services.items() if "profiles" not in service}
    assert outside_profiles == set(SERVICES)
    script = STACK.read_text()
    assert "up -d --no-build keygen redis" in script
    assert "up -d --no-build ingester" in script
    depends = {name: set(service.get("depends_on") or {}) for name, service in services.items()}
    reached: set[str] = set()
    todo = ["ingester"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(depends[name])
    assert reached == set(SERVICES)
