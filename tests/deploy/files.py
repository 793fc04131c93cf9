"""The deployment files as data, and what the code says they must agree with.

Parsers here are deliberately small: a Dockerfile reader (continuations, JSON forms,
stages), compose's `${VAR:-default}` interpolation, `.dockerignore` matching, Kubernetes
quantities and Go durations. The external tools (`docker compose`, `promtool`) are found
here too; a missing one fails the test that needs it, with the install line to run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final
from unittest.mock import patch

import pytest
import yaml

from ingester.settings import Settings

REPO: Final = Path(__file__).resolve().parents[2]
DEPLOY: Final = REPO / "deploy"
K8S: Final = DEPLOY / "k8s"
DOCKERFILE: Final = REPO / "Dockerfile"
TOP_COMPOSE: Final = REPO / "docker-compose.yml"
STACK_COMPOSE: Final = DEPLOY / "compose.yml"
DASHBOARD: Final = DEPLOY / "grafana" / "ingester-dashboard.json"
ALERTS: Final = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS: Final = DEPLOY / "prometheus" / "alerts.test.yml"

ENV_PREFIX: Final = str(Settings.model_config.get("env_prefix", ""))
# An INGESTER_ name not glued to a longer one (ARTSTORE_INGESTER_IMAGE is compose's own).
ENV_NAME_RE: Final = re.compile(rf"(?<![A-Za-z0-9_]){ENV_PREFIX}[A-Z0-9_]+")
# The reference Storage Element image and the ingester's are one: the project's version.
IMAGE_NAME: Final = "artstore-ingester"


# --- the code's side ---------------------------------------------------------------------


def setting_env_names() -> dict[str, str]:
    """`INGESTER_<FIELD>` -> field name, for every setting."""
    return {f"{ENV_PREFIX}{name.upper()}": name for name in Settings.model_fields}


def setting_default(field_name: str) -> Any:
    return Settings.model_fields[field_name].get_default(call_default_factory=True)


def load_settings(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> Settings:
    """Settings as `ingester serve` would read them from exactly this environment."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


@cache
def pyproject() -> dict[str, Any]:
    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def project_image() -> str:
    return f"{IMAGE_NAME}:{pyproject()['project']['version']}"


@cache
def app_routes() -> frozenset[str]:
    """Every GET route of the ingester's app, as the app itself registers them.

    Built from the defaults alone: the result is cached for the whole run, and a caller
    may have put a deployment's settings in the environment (a key file that exists only
    in the container made the first caller fail, in whichever order the tests ran)."""
    from ingester.http.app import create_app

    clean = {k: v for k, v in os.environ.items() if not k.startswith("INGESTER_")}
    with patch.dict(os.environ, clean, clear=True):
        app, _service = create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    return frozenset(
        rule.rule for rule in app.url_map.iter_rules() if "GET" in (rule.methods or ())
    )


# --- YAML, JSON ----------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


# --- compose -------------------------------------------------------------------------------

_INTERPOLATION_RE: Final = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: Mapping[str, str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$VAR` and `$$`, from `env`
    (empty by default: what the file gives on its own)."""
    env = env or {}

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        return env.get(name, match["default"] or "")

    return _INTERPOLATION_RE.sub(substitute, text)


@dataclass(frozen=True)
class EnvEntry:
    """One `environment:` entry of a compose service, as written."""

    raw: str | None  # None: passed through from the caller's environment when set there

    @property
    def reference(self) -> tuple[str, str | None] | None:
        """(variable, default) when the value is exactly `${VAR}` or `${VAR:-default}`."""
        if self.raw is None:
            return None
        match = _INTERPOLATION_RE.fullmatch(self.raw)
        if match is None or not match["braced"]:
            return None
        return match["braced"], match["default"]

    def resolved(self, env: Mapping[str, str] | None = None) -> str | None:
        return None if self.raw is None else interpolate(self.raw, env)


def service_environment(service: Mapping[str, Any]) -> dict[str, EnvEntry]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        pairs = [item.partition("=") for item in environment]
        return {name: EnvEntry(value if sep else None) for name, sep, value in pairs}
    return {
        name: EnvEntry(None if value is None else str(value)) for name, value in environment.items()
    }


def resolved_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """The service's environment with the file's defaults, pass-through entries left out."""
    return {
        name: value
        for name, entry in service_environment(service).items()
        if (value := entry.resolved()) is not None
    }


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


# A `:` that separates the short syntax's fields (not one inside `${VAR:-default}`).
_MOUNT_SEPARATOR_RE: Final = re.compile(r":(?![^{]*\})")


def service_mounts(service: Mapping[str, Any]) -> list[Mount]:
    """The service's volumes; sources as written (`${...}` left as is)."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = _MOUNT_SEPARATOR_RE.split(volume)
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
            mounts.append(Mount(parts[0], parts[1], read_only))
        else:
            mounts.append(Mount(volume["source"], volume["target"], bool(volume.get("read_only"))))
    return mounts


@cache
def compose_command() -> tuple[str, ...]:
    """`docker compose` (the plugin) or `docker-compose`; no engine is needed for `config`."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return (docker, "compose")
    standalone = shutil.which("docker-compose")
    if standalone is not None:
        return (standalone,)
    pytest.fail(
        "neither `docker compose` nor `docker-compose` is installed: "
        "`make test` installs docker-compose (scripts/deps.sh)"
    )


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: `make test` installs it (package prometheus, "
            "scripts/deps.sh)"
        )
    return path


# --- Dockerfile ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list)
        assert all(isinstance(item, str) for item in value)
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs (the only ENV form used here)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for item in _split_words(instruction.args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {instruction.args!r}: write key=value"
                values[key] = value
        return values


def _split_words(text: str) -> list[str]:
    import shlex

    return shlex.split(text)


def _logical_lines(text: str) -> Iterator[str]:
    current: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (and parser directives), also inside a continuation
        if stripped.endswith("\\"):
            current.append(stripped[:-1].strip())
            continue
        current.append(stripped)
        yield " ".join(part for part in current if part)
        current = []
    assert not current, "the Dockerfile ends inside a line continuation"


@cache
def dockerfile_stages() -> tuple[Stage, ...]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(DOCKERFILE.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            base = interpolate(words[0], args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, default = rest.partition("=")
            args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, rest.strip()))
    return tuple(stages)


def runtime_stage() -> Stage:
    return dockerfile_stages()[-1]


def healthcheck_command(instruction: Instruction) -> list[str]:
    """The exec-form command of `HEALTHCHECK [options] CMD [...]`."""
    _options, sep, command = instruction.args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {instruction.args!r}"
    argv = Instruction("CMD", command).exec_form()
    assert argv is not None, "HEALTHCHECK CMD must use the exec form (no shell)"
    return argv


def dockerfile_user() -> tuple[int, int]:
    user = runtime_stage().last("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER {user!r}: use numeric uid:gid"
    assert gid.isdigit(), f"USER {user!r}: use numeric uid:gid"
    return int(uid), int(gid)


# --- .dockerignore -------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append({"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char)))
        i += 1
    return re.compile("".join(out))


def dockerignore_excludes(path: str) -> bool:
    """Whether the build context leaves `path` out (Docker's rules: patterns in order, the
    last match wins, `!` re-includes, a pattern matching a directory covers its contents)."""
    excluded = False
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = _ignore_regex(os.path.normpath(line.lstrip("!").strip()).strip("/"))
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


# --- units ---------------------------------------------------------------------------------

_QUANTITY_SUFFIXES: Final = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "m": 10**-3, "": 1,
}  # fmt: skip


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("512Mi", "1", "500m", "100Gi") as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match is not None, f"quantity {value!r}"
    assert match[2] in _QUANTITY_SUFFIXES, f"quantity {value!r}"
    return float(match[1]) * _QUANTITY_SUFFIXES[match[2]]


def duration_s(value: str | int | float) -> float:
    """A compose / Go duration ("45s", "1m30s", "2m") in seconds."""
    text = str(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", text) if text else []
    assert parts, f"duration {value!r}"
    assert "".join(n + u for n, u in parts) == text, f"duration {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# --- metric names in PromQL ----------------------------------------------------------------

METRIC_RE: Final = re.compile(r"(?<![A-Za-z0-9_:])ingester_[a-z0-9_]+")


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variables."""
    dashboard = load_json(DASHBOARD)
    queries = []
    for panel in iter_panels(dashboard["panels"]):
        queries += [target["expr"] for target in panel.get("targets", []) if "expr" in target]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query["query"])
    return queries


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def alert_rules() -> list[dict[str, Any]]:
    document = load_yaml(ALERTS)
    return [rule for group in document["groups"] for rule in group["rules"]]


def promql_for_promtool(expr: str) -> str:
    """A Grafana query made plain PromQL: `$__rate_interval` and friends become 5m,
    template variables (used in regex matchers here) match anything."""
    expr = re.sub(r"\$__(?:rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)
