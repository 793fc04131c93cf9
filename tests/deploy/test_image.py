"""The image itself, built by `make image` with podman and run as deploy/k8s runs it
(read-only root, a volume on the spool, no capabilities), against a reference Storage
Element on the host: it gets ready, stores an upload whose checksum the element confirms,
runs as uid 10001, passes its own HEALTHCHECK, and drains an upload on SIGTERM, exit 0.

The container shares the host's network and binds 127.0.0.1 only; every test body runs
under `trio.fail_after`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from tests.conftest import TokenFactory
from tests.deploy.containers import (
    KEY_DIR,
    SPOOL_DIR,
    Container,
    Images,
    ingester_container,
    inspect,
    podman,
    unique_name,
)
from tests.deploy.files import setting_default
from tests.support.chaos import (
    PacedBody,
    Stored,
    assert_clear_error,
    assert_intact,
    post_paced,
)
from tests.support.client import MIB, MultipartUpload, auth, post_upload, random_chunks
from tests.support.fixtures import KeyPair
from tests.support.processes import StorageElementProcess, start_storage_element

# The image's user (Dockerfile: USER 10001:10001), checked on the running server process.
IMAGE_UID: Final = 10001


@pytest.fixture
def element(tmp_path: Path, keypair: KeyPair) -> Iterator[StorageElementProcess]:
    se = start_storage_element(
        tmp_path, element_id="se-edit", mode="edit", public_key=keypair.public_path
    )
    try:
        yield se
    finally:
        se.terminate()


@pytest.fixture
def container(
    images: Images, element: StorageElementProcess, keypair: KeyPair, tmp_path: Path
) -> Iterator[Container]:
    with ingester_container(
        images.ingester,
        name=unique_name("ingester-image"),
        root=tmp_path / "container",
        public_key=keypair.public_path,
        elements=[element.registry_entry()],
    ) as running:
        yield running


async def test_image_metadata_survives_the_podman_build(images: Images) -> None:
    """`podman build --format docker` keeps what the Dockerfile declares (the OCI format
    would drop the HEALTHCHECK)."""
    with trio.fail_after(60):
        (image,) = json.loads((await podman("image", "inspect", images.ingester)).stdout)
    assert image["ManifestType"] == "application/vnd.docker.distribution.manifest.v2+json"
    config = image["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["ingester"]
    assert config["Cmd"] == ["serve"]
    assert set(config["ExposedPorts"]) == {"8020/tcp"}
    assert set(config["Volumes"]) == {SPOOL_DIR}
    assert config["StopSignal"] == "SIGTERM"
    assert "INGESTER_SPOOL_DIR=" + SPOOL_DIR in config["Env"]
    check = image["Healthcheck"]["Test"]
    assert check[:2] == ["CMD", "python"]
    assert "/health/live" in check[-1]


async def test_container_serves_an_upload_read_only_as_uid_10001_and_is_healthy(
    container: Container, element: StorageElementProcess, token: TokenFactory
) -> None:
    with trio.fail_after(90):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            ready = await http.get(container.url + "/health/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["writable_storage_elements"] == [element.element_id]

            body = MultipartUpload(
                random_chunks(3 * MIB + 12345, seed=16),
                fields=[("retention_policy", "temporary")],
                filename="image.bin",
            )
            response = await post_upload(http, container.url, token(), body)
            stored = Stored.of(response, body)
            assert stored.element_id == element.element_id
            # The element's own record of the file, then its bytes.
            record = await http.get(
                f"{element.url}/api/v1/files/{stored.file_id}", headers=auth(token())
            )
            assert record.status_code == 200, record.text
            assert record.json()["checksum"] == body.sha256
            assert record.json()["file_size"] == body.size
            await assert_intact(http, stored, token())

        # The server is PID 1 (exec form: it gets the signals) and runs as the image's user.
        status = (await podman("exec", container.name, "cat", "/proc/1/status")).stdout
        (uid_line,) = [line for line in status.splitlines() if line.startswith("Uid:")]
        assert uid_line.split()[1:] == [str(IMAGE_UID)] * 4, uid_line
        cmdline = (await podman("exec", container.name, "cat", "/proc/1/cmdline")).stdout
        argv = cmdline.rstrip("\0").split("\0")
        assert argv[-1] == "serve", argv
        assert any(part.endswith("/ingester") for part in argv), argv

        # The image's own HEALTHCHECK, run by podman.
        health = await podman("healthcheck", "run", container.name, check=False)
        assert health.returncode == 0, health.output_tail()
        state = await inspect(container.name)
        assert state["State"]["Health"]["Status"] == "healthy"

        # Read-only everywhere but the spool volume and /tmp.
        assert state["HostConfig"]["ReadonlyRootfs"] is True
        for path in ("/var/lib/ingester/probe", "/etc/probe", f"{KEY_DIR}/probe"):
            refused = await podman("exec", container.name, "touch", path, check=False)
            assert refused.returncode != 0, path
            assert "Read-only file system" in refused.stderr, refused.stderr
        for path in (f"{SPOOL_DIR}/probe", "/tmp/probe"):
            await podman("exec", container.name, "touch", path)
            await podman("exec", container.name, "rm", path)
    assert "Traceback" not in container.logs()


async def test_sigterm_during_an_upload_drains_it_and_exits_0(
    container: Container, element: StorageElementProcess, token: TokenFactory
) -> None:
    upload_id = str(uuid.uuid4())
    body = MultipartUpload(random_chunks(4 * MIB, seed=17), filename="draining.bin")
    paced = PacedBody(body, hold_at=MIB)
    answer: list[httpx.Response] = []

    async def upload(http: httpx.AsyncClient) -> None:
        answer.append(
            await post_paced(
                http, container.url, token(), body, paced, **{"X-Upload-ID": upload_id}
            )
        )

    with trio.fail_after(90):
        async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload, http)
                await paced.holding.wait()
                # In flight on the server's side, not only sent by this client.
                while True:
                    progress = await http.get(
                        f"{container.url}/api/v1/files/uploads/{upload_id}", headers=auth(token())
                    )
                    if progress.status_code == 200 and progress.json()["bytes_received"] > 0:
                        break
                    await trio.sleep(0.05)

                await podman("kill", "--signal", "SIGTERM", container.name)
                signalled = trio.current_time()
                # Readiness turns 503 at once: the signal reached the server (PID 1).
                while True:
                    if (await http.get(container.url + "/health/ready")).status_code == 503:
                        break
                    await trio.sleep(0.05)
                late = await post_upload(
                    http, container.url, token(), MultipartUpload([b"late"], filename="late.bin")
                )
                assert late.status_code == 503, late.text
                assert assert_clear_error(late) == "SHUTTING_DOWN"
                assert (await inspect(container.name))["State"]["Running"] is True
                paced.release()

            (response,) = answer
            stored = Stored.of(response, body)
            await assert_intact(http, stored, token())
        exit_code = (await podman("wait", container.name)).stdout.strip()
        stopped_after = trio.current_time() - signalled
    assert exit_code == "0", container.logs()
    # It left once its last upload was done, not at the end of the grace period.
    assert stopped_after < setting_default("shutdown_grace_s"), stopped_after
    assert "Traceback" not in container.logs()
