"""The deployment files against a running stack (reference Storage Elements and the ingester,
real processes on loopback): every metric the dashboard and alerts use is exposed after a few
uploads, and the probe commands and paths the files carry answer as intended."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Iterable
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack, TokenFactory
from tests.deploy.files import (
    K8S,
    METRIC_RE,
    STACK_COMPOSE,
    TOP_COMPOSE,
    alert_rules,
    dashboard_queries,
    healthcheck_command,
    load_yaml,
    load_yaml_documents,
    runtime_stage,
)
from tests.support.client import MultipartUpload, post_upload, text_chunks
from tests.support.processes import child_env, free_port

# Sample names a family of each type exposes (prometheus_client strips _total from counters).
SERIES_SUFFIXES: Final = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "info": ("_info",),
}


def exposed_series(exposition: str) -> set[str]:
    """Every sample name the exposition declares, with or without samples yet."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        for suffix in SERIES_SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def used_metric_names() -> set[str]:
    texts = dashboard_queries()
    for rule in alert_rules():
        texts += [rule["expr"], *rule["annotations"].values()]
    return {name for text in texts for name in METRIC_RE.findall(text)}


async def test_every_metric_of_the_dashboard_and_alerts_is_exposed(
    stack: Stack, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            stored = await post_upload(
                http,
                stack.url,
                token(),
                MultipartUpload(text_chunks(64 * 1024), fields=[("compress", "true")]),
            )
            assert stored.status_code == 201, stored.text
            plain = await post_upload(http, stack.url, token(), MultipartUpload([b"x" * 5000]))
            assert plain.status_code == 201, plain.text
            refused = await post_upload(
                http, stack.url, token(), MultipartUpload([b"x"], fields=[("ttl_days", "0")])
            )
            assert refused.status_code == 400
            unauthorized = await http.post(stack.url + "/api/v1/files/upload")
            assert unauthorized.status_code == 401
            exposition = (await http.get(stack.url + "/metrics")).text
    exposed = exposed_series(exposition)
    used = used_metric_names()
    assert len(used) >= 15, sorted(used)
    missing = sorted(used - exposed)
    assert not missing, f"used by deploy/ but not in /metrics: {missing}"
    # The uploads above show up where the dashboard looks for them.
    samples = {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    assert ("ingester_uploads_total", (("outcome", "success"),)) in samples
    assert ("ingester_uploads_total", (("outcome", "INVALID_FIELD"),)) in samples


def test_exposed_series_knows_suffixes_by_type() -> None:
    exposition = (
        "# HELP a_total A.\n# TYPE a_total counter\n"
        '# HELP b B.\n# TYPE b histogram\nb_bucket{le="+Inf"} 0.0\nb_count 0.0\nb_sum 0.0\n'
        "# HELP c C.\n# TYPE c gauge\nc 1.0\n"
    )
    names = exposed_series(exposition)
    assert {"a_total", "b_bucket", "b_count", "b_sum", "c"} <= names
    assert "a" not in names
    assert "b" not in names
    assert "c_total" not in names


async def run_check(argv: list[str], env: dict[str, str] | None = None) -> int:
    """A healthcheck command as the container runs it, with this test run's Python."""
    command = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
    result = await trio.run_process(
        command,
        env=child_env(env),
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return result.returncode


def compose_check(service: dict[str, Any]) -> list[str]:
    """The check's argv: exec form, or one plain command in the shell form (the try-it
    stack's, for Debian's podman-compose: see deploy/compose.yml), split as sh would."""
    test = service["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        (line,) = test[1:]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv = list(lexer)
        shell_syntax = [part for part in argv if set(part) <= set("();<>|&")]
        assert not shell_syntax, f"one command, no shell syntax: {line!r}"
        assert "$" not in line, f"no expansions: {line!r}"
        assert "`" not in line, f"no expansions: {line!r}"
        return argv
    assert test[0] == "CMD", "exec form, or one command in the shell form"
    return list(test[1:])


def on_port(argv: Iterable[str], old: int, new: int) -> list[str]:
    return [part.replace(f"127.0.0.1:{old}/", f"127.0.0.1:{new}/") for part in argv]


async def test_image_and_compose_healthchecks_pass_on_a_live_ingester_and_fail_without(
    stack: Stack,
) -> None:
    port = urlsplit(stack.url).port
    assert port is not None
    dead = free_port()
    with trio.fail_after(60):
        # The image's HEALTHCHECK and the top-level compose's read INGESTER_PORT.
        for argv in (
            healthcheck_command(runtime_stage().last("HEALTHCHECK")),
            compose_check(load_yaml(TOP_COMPOSE)["services"]["ingester"]),
        ):
            assert await run_check(argv, {"INGESTER_PORT": str(port)}) == 0, argv
            assert await run_check(argv, {"INGESTER_PORT": str(dead)}) != 0, argv
        # The try-it stack's checks name their fixed ports: moved onto the live ones (the
        # ingester's names its internal listener; the live one serves probes on its port).
        services = load_yaml(STACK_COMPOSE)["services"]
        targets = {
            "ingester": (8021, port),
            "se-edit": (8010, urlsplit(stack.se_edit.url).port),
            "se-rw": (8010, urlsplit(stack.se_rw.url).port),
        }
        for name, (fixed, live) in targets.items():
            assert live is not None
            argv = compose_check(services[name])
            assert any(f"127.0.0.1:{fixed}/" in part for part in argv), (name, argv)
            assert await run_check(on_port(argv, fixed, live)) == 0, name
            assert await run_check(on_port(argv, fixed, dead)) != 0, name


async def test_kubernetes_probe_paths_answer_200_on_a_live_ingester(stack: Stack) -> None:
    (deployment,) = load_yaml_documents(K8S / "deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    paths = {
        container[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    paths.add(deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    with trio.fail_after(15):
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            for path in sorted(paths):
                response = await http.get(stack.url + path)
                assert response.status_code == 200, (path, response.text)
