"""Every INGESTER_ name written in a deployment file is a setting the ingester reads."""

from __future__ import annotations

from pathlib import Path

from tests.deploy.files import (
    DEPLOY,
    DOCKERFILE,
    ENV_NAME_RE,
    REPO,
    TOP_COMPOSE,
    setting_env_names,
)


def deployment_files() -> list[Path]:
    files = [DOCKERFILE, REPO / ".dockerignore", TOP_COMPOSE]
    files += sorted(path for path in DEPLOY.rglob("*") if path.is_file())
    return files


def test_every_ingester_variable_in_deploy_files_is_a_setting() -> None:
    known = setting_env_names()
    unknown: dict[str, set[str]] = {}
    seen: set[str] = set()
    for path in deployment_files():
        for name in ENV_NAME_RE.findall(path.read_text()):
            seen.add(name)
            if name not in known:
                unknown.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert not unknown, f"not settings (ingester/settings.py): {unknown}"
    # Not vacuous: the files do configure the ingester through these names.
    assert len(seen) >= 20, sorted(seen)


def test_the_scan_sees_a_misspelt_name_and_ignores_compose_own_variables() -> None:
    text = "INGESTER_PORT ${INGESTER_PROT:-1} ARTSTORE_INGESTER_IMAGE $(INGESTER_SPOOL_DIR)"
    assert ENV_NAME_RE.findall(text) == ["INGESTER_PORT", "INGESTER_PROT", "INGESTER_SPOOL_DIR"]
