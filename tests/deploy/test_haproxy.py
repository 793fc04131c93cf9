"""deploy/haproxy/haproxy.cfg: what ingester/haproxy_config.py renders, valid for haproxy, and
with the properties the replicas rely on (readiness checks, draining, no stickiness)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ingester.haproxy_config import Server, render
from ingester.settings import Settings
from tests.deploy.files import DEPLOY
from tests.support.haproxy import haproxy_binary

CONFIG = DEPLOY / "haproxy" / "haproxy.cfg"
# The replicas of the deploy file: the compose/k8s default ports (public 8020, internal 8021).
REPLICAS = [Server(f"ingester-{i}", f"ingester-{i}:8020", check_port=8021) for i in (1, 2, 3)]


def deploy_render() -> str:
    return render(":8020", REPLICAS, stats_bind=":8404", names_may_not_resolve=True)


def test_the_deploy_file_is_the_rendered_configuration() -> None:
    assert CONFIG.read_text() == deploy_render(), (
        "deploy/haproxy/haproxy.cfg is out of date: re-render it with "
        "tests.deploy.test_haproxy.deploy_render()"
    )


def test_haproxy_accepts_it(tmp_path: Path) -> None:
    for text in (CONFIG.read_text(), render("127.0.0.1:18020", [Server("a", "127.0.0.1:1")])):
        path = tmp_path / "haproxy.cfg"
        path.write_text(text)
        result = subprocess.run(
            [haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_checks_readiness_on_the_internal_port_and_keeps_draining_requests() -> None:
    lines = [line.strip() for line in CONFIG.read_text().splitlines()]
    assert "http-check send meth GET uri /health/ready" in lines
    assert "http-check expect status 200" in lines
    for replica in REPLICAS:
        assert f"server {replica.name} {replica.address} port 8021" in lines
    text = CONFIG.read_text()
    # A replica marked down (draining) finishes what it has: its sessions are not cut.
    assert "shutdown-sessions" not in text
    # No stickiness of any kind.
    for sticky in ("stick-table", "stick on", "cookie", "balance source", "hash-type"):
        assert sticky not in text


def test_timeouts_outlast_the_ingesters_own() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    text = CONFIG.read_text()
    stream_s = int(text.split("timeout server ", 1)[1].split("s", 1)[0])
    assert stream_s == int(text.split("timeout client ", 1)[1].split("s", 1)[0])
    # The longest a healthy request is silent, and the element's answer after the body.
    assert stream_s > settings.tus_completion_wait_s
    assert stream_s > settings.se_response_timeout_s
    assert stream_s > settings.client_idle_timeout_s
    request_s = int(text.split("timeout http-request ", 1)[1].split("s", 1)[0])
    assert request_s > settings.header_timeout_s
