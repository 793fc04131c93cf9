"""The command line as a user runs it: real processes, real output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import trio

from ingester.settings import Settings
from tests.support.client import MultipartUpload, post_upload
from tests.support.fixtures import KeyPair
from tests.support.processes import child_env, dev_stack, free_port_run

REPO = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingester", *args],
        env=child_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_token_command_prints_a_verifiable_token(keypair: KeyPair) -> None:
    result = run_cli(
        "token",
        "--key",
        str(keypair.private_path),
        "--role",
        "operator",
        "--sub",
        "ops",
        "--ttl",
        "60",
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, keypair.public_path.read_bytes(), algorithms=["RS256"])
    assert claims["sub"] == "ops"
    assert claims["role"] == "operator"
    assert claims["type"] == "service_account"
    assert claims["exp"] - claims["iat"] == 60
    refresh = run_cli("token", "--key", str(keypair.private_path), "--type", "refresh")
    assert (
        jwt.decode(refresh.stdout.strip(), keypair.public_path.read_bytes(), algorithms=["RS256"])[
            "type"
        ]
        == "refresh"
    )


def test_token_command_with_a_missing_key_says_so(tmp_path: Path) -> None:
    result = run_cli("token", "--key", str(tmp_path / "nope.pem"))
    assert result.returncode == 2
    assert "cannot read key" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_invalid_settings_with_one_line_each(tmp_path: Path) -> None:
    result = run_cli(
        "serve",
        env={
            "INGESTER_PORT": "not-a-port",
            "INGESTER_STORAGE_ELEMENTS": "[{broken",
            "INGESTER_LOG_FORMAT": "xml",
        },
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == 3, lines
    assert any(line.startswith("invalid configuration: INGESTER_PORT") for line in lines)
    assert any(
        line.startswith("invalid configuration: INGESTER_STORAGE_ELEMENTS") for line in lines
    )
    assert any(line.startswith("invalid configuration: INGESTER_LOG_FORMAT") for line in lines)
    # The value given is shown (not for secrets), without pydantic's "Value error," noise.
    assert "(got 'xml')" in result.stderr
    assert "Value error" not in result.stderr


def test_serve_reports_every_rule_across_settings_at_once(tmp_path: Path) -> None:
    elements = (
        '[{"id": "a", "api_url": "http://127.0.0.1:1", "mode": "edit"},'
        ' {"id": "a", "api_url": "http://127.0.0.1:2", "mode": "rw"}]'
    )
    result = run_cli(
        "serve",
        env={
            "INGESTER_AUTH_PUBLIC_KEY_PATH": str(tmp_path / "key.pem"),
            "INGESTER_AUTH_JWKS_URL": "http://127.0.0.1:1/jwks",
            "INGESTER_SE_AUTH": "client_credentials",
            "INGESTER_SE_CLIENT_SECRET": "hunter2",
            "INGESTER_STORAGE_ELEMENTS": elements,
        },
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "invalid configuration: set INGESTER_AUTH_PUBLIC_KEY_PATH or INGESTER_AUTH_JWKS_URL, "
        "not both",
        "invalid configuration: INGESTER_SE_AUTH=client_credentials needs INGESTER_SE_TOKEN_URL, "
        "INGESTER_SE_CLIENT_ID and INGESTER_SE_CLIENT_SECRET",
        "invalid configuration: INGESTER_STORAGE_ELEMENTS has duplicate ids",
    ]
    assert "hunter2" not in result.stderr


def test_env_example_documents_every_setting() -> None:
    documented = set(
        re.findall(r"^# (INGESTER_[A-Z0-9_]+)=", (REPO / ".env.example").read_text(), re.M)
    )
    expected = {f"INGESTER_{name.upper()}" for name in Settings.model_fields}
    assert documented == expected


async def test_dev_stack_from_banner_to_stored_file_and_clean_stop(tmp_path: Path) -> None:
    """What a newcomer does after `make run`: paste the token, upload, see the file, Ctrl-C."""
    port = free_port_run(3)
    data_dir = tmp_path / "dev"
    with trio.fail_after(60):
        async with dev_stack(tmp_path, "--port", str(port), "--data-dir", str(data_dir)) as dev:
            process, log, banner, token = dev.process, dev.log, dev.banner, dev.token
            url = f"http://127.0.0.1:{port}"
            assert f"{url}/api/v1/files/upload" in banner
            # The API is on show: the docs page, listed in the service info.
            assert f"API docs: {url}/docs" in banner
            async with httpx.AsyncClient(trust_env=False) as http:
                docs = await http.get(url + "/docs")
                assert docs.status_code == 200
                assert "swagger-ui" in docs.text
                info = (await http.get(url + "/")).json()
                assert info["endpoints"]["docs"] == "/docs"
            # The banner's client line, pasted as it is (with $TOKEN set, as the banner says).
            upload_line = re.search(
                r"^    (\S+) upload --url (\S+) --token \"\$TOKEN\" (\S+)$", banner, re.M
            )
            assert upload_line is not None, banner
            assert upload_line.group(2) == url
            assert upload_line.group(1) == str(Path(sys.executable).parent / "ingester")
            (tmp_path / "hello-cli.txt").write_bytes(b"hello from the client\n")
            pasted = await trio.run_process(
                [upload_line.group(1), "upload", "--url", url, "--token", token, "hello-cli.txt"],
                cwd=tmp_path,
                env=child_env({"XDG_CACHE_HOME": str(tmp_path / "cache")}),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert pasted.returncode == 0, pasted.stderr
            assert pasted.stdout.decode().startswith("hello-cli.txt: stored 22 B as ")
            async with httpx.AsyncClient(trust_env=False) as http:
                response = await post_upload(
                    http,
                    f"http://127.0.0.1:{port}",
                    token,
                    MultipartUpload(
                        [b"hello artStore\n"],
                        filename="hello.txt",
                        fields=[("retention_policy", "temporary")],
                    ),
                )
            assert response.status_code == 201, response.text
            stored = data_dir / "se-edit" / response.json()["storage_filename"]
            assert stored.read_bytes() == b"hello artStore\n"
            from_client = list((data_dir / "se-edit").glob("hello-cli_*.txt"))
            assert [p.read_bytes() for p in from_client] == [b"hello from the client\n"]
            assert (data_dir / "keys" / "private.pem").exists()
            # Ctrl-C reaches the whole foreground process group.
            os.killpg(process.pid, signal.SIGINT)
            await process.exited()
            assert process.returncode == 0, log.read_text()[-2000:]
            leftovers = await trio.run_process(
                ["pgrep", "-f", f"data-dir {data_dir}"], capture_stdout=True, check=False
            )
            # pgrep exits 1 when nothing matches (2 would be a usage error, not a pass).
            assert leftovers.returncode == 1, leftovers.stdout
