"""docker-compose.yml (the ingester in the artStore stack) and deploy/compose.yml (the stack
to try it) against the code, and through `docker compose config` (no engine needed)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jwt
import pytest
import yaml

from ingester.app_main import HYPERCORN_GRACE_S
from ingester.cli import _parser as cli_parser
from ingester.registry_cli import _parser as registry_parser
from tests.deploy.files import (
    DEPLOY,
    ENV_PREFIX,
    REPO,
    STACK_COMPOSE,
    TOP_COMPOSE,
    compose_command,
    duration_s,
    load_settings,
    load_yaml,
    project_image,
    resolved_environment,
    runtime_stage,
    service_environment,
    service_mounts,
    setting_default,
    setting_env_names,
)
from tests.support.processes import child_env

# Settings the top-level file does not take from the environment, and why.
LEFT_OUT: Final = {
    "INGESTER_AUTH_JWKS_URL": "the alternative to the mounted PEM key; both cannot be set",
}
# Fixed by the file because a mount defines them.
FIXED: Final = {"INGESTER_AUTH_PUBLIC_KEY_PATH", "INGESTER_SPOOL_DIR"}
# Defaults that point at artStore's services instead of the ingester's own default.
INFRASTRUCTURE: Final = {"INGESTER_REDIS_URL"}


def compose(path: Path) -> dict[str, Any]:
    document = load_yaml(path)
    assert isinstance(document, dict)
    return document


def top_service() -> dict[str, Any]:
    service = compose(TOP_COMPOSE)["services"]["ingester"]
    assert isinstance(service, dict)
    return service


def stack_services() -> dict[str, Any]:
    services = compose(STACK_COMPOSE)["services"]
    assert isinstance(services, dict)
    return services


def run_compose_config(path: Path, scratch: Path, *extra: str) -> dict[str, Any]:
    """`config` with an empty environment file: a developer's .env does not count."""
    env_file = scratch / "empty.env"
    env_file.write_text("")
    env = {
        key: value
        for key, value in child_env().items()
        if not key.startswith((ENV_PREFIX, "ARTSTORE_", "COMPOSE_", "DOCKER_"))
    }
    argv = [*compose_command(), "--env-file", str(env_file), *extra, "-f", str(path), "config"]
    result = subprocess.run(
        argv, cwd=path.parent, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"{shlex.join(argv)}:\n{result.stderr}"
    document = yaml.safe_load(result.stdout)
    assert isinstance(document, dict)
    return document


# --- both files through the real tool ------------------------------------------------------


def test_compose_config_accepts_the_top_level_file_and_resolves_as_we_do(
    tmp_path: Path,
) -> None:
    resolved = run_compose_config(TOP_COMPOSE, tmp_path)
    assert set(resolved["services"]) == {"ingester"}
    tool_env = {
        name: str(value)
        for name, value in resolved["services"]["ingester"]["environment"].items()
        if value is not None
    }
    assert tool_env == resolved_environment(top_service())


@pytest.mark.parametrize("profiles", [(), ("--profile", "observability")])
def test_compose_config_accepts_the_stack(profiles: tuple[str, ...], tmp_path: Path) -> None:
    resolved = run_compose_config(STACK_COMPOSE, tmp_path, *profiles)
    expected = {"keygen", "redis", "se-edit", "se-rw", "registry-init", "ingester"}
    if profiles:
        expected |= {"prometheus", "grafana"}
    assert expected <= set(resolved["services"])


# --- docker-compose.yml: the ingester inside artStore ----------------------------------------


def test_top_level_runs_the_ingester_only_on_the_external_artstore_network() -> None:
    document = compose(TOP_COMPOSE)
    assert set(document["services"]) == {"ingester"}
    assert document["networks"]["artstore_network"] == {"external": True}
    assert top_service()["networks"] == ["artstore_network"]
    assert top_service()["image"].endswith(f":-{project_image()}}}")
    assert top_service()["build"] == "."


def test_every_setting_comes_from_the_environment() -> None:
    environment = service_environment(top_service())
    expected = set(setting_env_names()) - set(LEFT_OUT)
    assert set(environment) == expected, (
        f"missing: {sorted(expected - set(environment))}, "
        f"unknown: {sorted(set(environment) - expected)}"
    )
    for name, entry in environment.items():
        if name in FIXED:
            assert entry.raw, name
            assert "$" not in entry.raw, name
            continue
        if entry.raw is None:
            assert setting_default(setting_env_names()[name]) is None, (
                f"{name} is passed through, but the setting has a default: write it"
            )
            continue
        reference = entry.reference
        assert reference is not None, f"{name}: {entry.raw!r} is not ${{{name}:-default}}"
        assert reference[0] == name, f"{name}: {entry.raw!r} reads another variable"


def test_defaults_are_the_settings_own(monkeypatch: pytest.MonkeyPatch) -> None:
    names = setting_env_names()
    for name, entry in service_environment(top_service()).items():
        reference = entry.reference
        if reference is None or name in INFRASTRUCTURE:
            continue
        default = reference[1]
        assert default is not None, f"{name} has no default in the file"
        field = names[name]
        loaded = getattr(load_settings(monkeypatch, {name: default}), field)
        assert loaded == setting_default(field), f"{name}: {default!r} is not the default"


def test_the_resolved_environment_is_valid_and_points_at_artstore_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment = resolved_environment(top_service())
    settings = load_settings(monkeypatch, environment)
    assert settings.redis_url is not None
    assert urlsplit(settings.redis_url).hostname == "redis"
    for value in environment.values():
        assert "localhost" not in value, value
        assert "127.0.0.1" not in value, value


def test_public_key_is_mounted_read_only_where_the_setting_points() -> None:
    environment = resolved_environment(top_service())
    mounts = {mount.target: mount for mount in service_mounts(top_service())}
    key = mounts[environment["INGESTER_AUTH_PUBLIC_KEY_PATH"]]
    assert key.read_only
    assert key.source.startswith("${ARTSTORE_JWT_PUBLIC_KEY_FILE:-")
    spool = mounts[environment["INGESTER_SPOOL_DIR"]]
    assert not spool.read_only
    assert spool.target == runtime_stage().env()["INGESTER_SPOOL_DIR"]
    assert spool.source in compose(TOP_COMPOSE)["volumes"]


def test_port_healthcheck_and_stop_grace_agree_with_settings() -> None:
    from tests.deploy.files import app_routes, interpolate

    service = top_service()
    environment = resolved_environment(service)
    port = setting_default("port")
    assert environment["INGESTER_PORT"] == str(port)
    (mapping,) = service["ports"]
    assert interpolate(mapping).split(":")[-1] == str(port)
    check = service["healthcheck"]["test"]
    assert check[:2] == ["CMD", "python"]
    assert "/health/live" in check[-1]
    assert "/health/live" in app_routes()
    grace = float(environment["INGESTER_SHUTDOWN_GRACE_S"])
    assert grace == setting_default("shutdown_grace_s")
    assert duration_s(service["stop_grace_period"]) > grace + HYPERCORN_GRACE_S
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert "command" not in service, "keep the image's CMD"
    assert "entrypoint" not in service, "keep the image's ENTRYPOINT"


# --- deploy/compose.yml: the stack to try it -------------------------------------------------


def element_args(service: dict[str, Any]) -> Any:
    args = cli_parser().parse_args(service["command"])
    assert args.command == "storage-element"
    return args


def elements() -> dict[str, Any]:
    return {
        name: element_args(service)
        for name, service in stack_services().items()
        if isinstance(service.get("command"), list) and "storage-element" in service["command"]
    }


def test_stack_runs_every_part_from_the_one_image() -> None:
    services = stack_services()
    image = f"${{ARTSTORE_INGESTER_IMAGE:-{project_image()}}}"
    for name in ("keygen", "se-edit", "se-rw", "registry-init", "ingester"):
        assert services[name]["image"] == image, name
        assert services[name]["build"] == "..", name
    assert set(elements()) == {"se-edit", "se-rw"}
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]


def test_storage_elements_parse_with_the_cli_and_use_the_generated_public_key() -> None:
    services = stack_services()
    modes = set()
    for name, args in elements().items():
        service = services[name]
        modes.add(args.mode)
        assert args.element_id == name
        assert args.host == "0.0.0.0"
        mounts = {mount.target: mount for mount in service_mounts(service)}
        assert str(args.data_dir) in mounts
        assert not mounts[str(args.data_dir)].read_only
        key_dir = mounts[str(args.public_key.parent)]
        assert key_dir.read_only
        assert key_dir.source == "jwt-public"
        check = service["healthcheck"]["test"][-1]
        assert f"http://127.0.0.1:{args.port}/health/" in check
        assert services[name]["depends_on"]["keygen"]["condition"] == (
            "service_completed_successfully"
        )
    assert modes == {"edit", "rw"}, "one temporary (edit) and one permanent (rw) element"


def registry_commands() -> list[Any]:
    service = stack_services()["registry-init"]
    assert service["entrypoint"][0] == "/bin/sh"
    parsed = []
    for line in service["command"][0].splitlines():
        words = shlex.split(line)
        if not words:
            continue
        assert words[:2] == ["ingester", "registry"], line
        parsed.append(registry_parser().parse_args(words[2:]))
    return parsed


def test_registry_init_registers_every_element_at_its_service_address() -> None:
    services = stack_services()
    registered = {
        (args.id, args.api_url, args.mode) for args in registry_commands() if args.action == "set"
    }
    expected = {
        (args.element_id, f"http://{name}:{args.port}", args.mode)
        for name, args in elements().items()
    }
    assert registered == expected
    init = services["registry-init"]
    assert init["restart"] == "no"
    assert init["depends_on"]["redis"]["condition"] == "service_healthy"
    assert (
        init["environment"]["INGESTER_REDIS_URL"]
        == (services["ingester"]["environment"]["INGESTER_REDIS_URL"])
    )
    assert urlsplit(init["environment"]["INGESTER_REDIS_URL"]).hostname == "redis"


def test_stack_ingester_settings_are_valid_and_wait_for_the_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.deploy.files import app_routes

    services = stack_services()
    service = services["ingester"]
    environment = resolved_environment(service)
    settings = load_settings(monkeypatch, environment)
    assert settings.redis_url is not None
    assert urlsplit(settings.redis_url).hostname == "redis"
    assert settings.se_auth.value == "forward", "the elements trust the same key"
    mounts = {mount.target: mount for mount in service_mounts(service)}
    assert settings.auth_public_key_path is not None
    key_dir = mounts[str(settings.auth_public_key_path.parent)]
    assert key_dir.read_only
    assert key_dir.source == "jwt-public"
    assert str(settings.spool_dir) in mounts
    (mapping,) = service["ports"]
    from tests.deploy.files import interpolate

    assert interpolate(mapping).split(":")[-1] == str(settings.port)
    conditions = {name: dep["condition"] for name, dep in service["depends_on"].items()}
    assert conditions == {
        "registry-init": "service_completed_successfully",
        "se-edit": "service_healthy",
        "se-rw": "service_healthy",
    }
    # The healthcheck asks the internal listener, which has the readiness detail.
    assert settings.internal_port is not None
    assert settings.internal_port != settings.port
    check = service["healthcheck"]["test"][-1]
    assert f"http://127.0.0.1:{settings.internal_port}/health/ready" in check
    assert "/health/ready" in app_routes()
    assert duration_s(service["stop_grace_period"]) > settings.shutdown_grace_s + (
        HYPERCORN_GRACE_S
    )


def test_keygen_makes_a_key_pair_that_ingester_token_signs_with(tmp_path: Path) -> None:
    """Run the keygen container's own command on this machine (paths moved to tmp)."""
    keygen = stack_services()["keygen"]
    mounts = {mount.source: mount.target for mount in service_mounts(keygen)}
    private_dir, public_dir = mounts["jwt-private"], mounts["jwt-public"]
    argv = list(keygen["entrypoint"])
    assert argv[:2] == ["python", "-c"]
    script = argv[2].replace(private_dir, str(tmp_path / "keys"))
    script = script.replace(public_dir, str(tmp_path / "public"))
    (tmp_path / "public").mkdir()
    for _ in range(2):  # a second run keeps the key pair
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60, env=child_env())
    public_key = tmp_path / "public" / "public.pem"
    elements_key = {str(args.public_key) for args in elements().values()}
    assert elements_key == {f"{public_dir}/public.pem"}
    token = subprocess.run(
        [sys.executable, "-m", "ingester", "token", "--key", str(tmp_path / "keys/private.pem")],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
        env=child_env(),
    ).stdout.strip()
    claims = jwt.decode(token, public_key.read_bytes(), algorithms=["RS256"])
    assert claims["role"] == "user"


def test_observability_profile_scrapes_the_ingester_and_loads_rules_and_dashboard() -> None:
    services = stack_services()
    prometheus_config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = prometheus_config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    # Metrics are on the internal listener (the public /metrics is 404 with it set).
    port = resolved_environment(services["ingester"])["INGESTER_INTERNAL_PORT"]
    assert target == f"ingester:{port}"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    prometheus_mounts = {m.source: m.target for m in service_mounts(services["prometheus"])}
    assert prometheus_mounts["./prometheus/alerts.yml"] in prometheus_config["rule_files"]
    grafana_mounts = {m.source: m.target for m in service_mounts(services["grafana"])}
    provisioning = DEPLOY / "grafana" / "provisioning"
    (provider,) = load_yaml(provisioning / "dashboards" / "ingester.yml")["providers"]
    dashboard_target = grafana_mounts["./grafana/ingester-dashboard.json"]
    assert dashboard_target.rsplit("/", 1)[0] == provider["options"]["path"]
    assert grafana_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    for relative in prometheus_mounts | grafana_mounts:
        assert (DEPLOY / relative).exists(), relative
    assert (REPO / "deploy" / "compose.yml").exists()
