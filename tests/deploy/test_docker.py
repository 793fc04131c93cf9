"""The Dockerfile and .dockerignore against the code, without a Docker engine.

The image itself is built where an engine runs; here: its stages, entry point, user, port,
probe and spool volume agree with pyproject, the CLI, the settings and the app's routes.
"""

from __future__ import annotations

import re

from ingester.cli import _parser as cli_parser
from tests.deploy.files import (
    REPO,
    dockerfile_stages,
    dockerfile_user,
    dockerignore_excludes,
    healthcheck_command,
    pyproject,
    runtime_stage,
    setting_default,
)


def test_two_stages_builder_and_a_slim_runtime_of_the_project_python() -> None:
    stages = dockerfile_stages()
    assert [stage.name for stage in stages] == ["builder", "runtime"]
    runtime = runtime_stage()
    assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", runtime.base), runtime.base
    assert pyproject()["project"]["requires-python"] == ">=3.11"
    assert stages[0].base == runtime.base, "wheels built for another Python than the runtime's"


def test_builder_makes_wheels_and_the_runtime_installs_only_those() -> None:
    builder, runtime = dockerfile_stages()
    builder_runs = " ".join(i.args for i in builder.all("RUN"))
    assert "pip wheel" in builder_runs
    runtime_runs = [i.args for i in runtime.all("RUN")]
    installs = [run for run in runtime_runs if "pip install" in run]
    assert installs, "the runtime installs nothing"
    for run in installs:
        assert "--no-index" in run, "the runtime must install from the built wheels only"
        assert "from=builder" in run
        assert "--find-links" in run
    for run in runtime_runs:
        for tool in ("apt-get install", "build-essential", "gcc", "pip wheel"):
            assert tool not in run, f"the runtime stage installs or builds: {run!r}"
    # No source tree in the runtime: nothing copied from the build context.
    assert not runtime.all("COPY")
    assert not runtime.all("ADD")


def test_entrypoint_is_the_console_script_in_exec_form() -> None:
    runtime = runtime_stage()
    entrypoint = runtime.last("ENTRYPOINT").exec_form()
    command = runtime.last("CMD").exec_form()
    assert entrypoint == ["ingester"], "ENTRYPOINT must be exec form: no shell to eat SIGTERM"
    assert command == ["serve"]
    assert pyproject()["project"]["scripts"]["ingester"] == "ingester.cli:main"
    assert cli_parser().parse_args(command).command == "serve"
    stop = runtime.all("STOPSIGNAL")
    assert not stop or stop[-1].args == "SIGTERM"


def test_runs_as_a_fixed_non_root_user() -> None:
    uid, gid = dockerfile_user()
    assert uid != 0
    assert gid != 0
    creates = " ".join(i.args for i in runtime_stage().all("RUN"))
    assert f"--uid {uid}" in creates
    assert f"--gid {gid}" in creates


def test_exposed_port_and_healthcheck_agree_with_settings_and_routes() -> None:
    from tests.deploy.files import app_routes

    runtime = runtime_stage()
    port = setting_default("port")
    assert runtime.last("EXPOSE").args.split() == [str(port)]
    check = runtime.last("HEALTHCHECK")
    argv = healthcheck_command(check)
    assert argv[0] == "python", "no curl in the slim image: the check runs Python"
    script = argv[-1]
    path = re.search(r"http://127\.0\.0\.1:[^/]+(/[\w/.-]*)", script)
    assert path is not None
    assert path[1] == "/health/live"
    assert path[1] in app_routes()
    default_port = re.search(r"INGESTER_PORT'\s*,\s*'(\d+)'", script)
    assert default_port is not None
    assert int(default_port[1]) == port
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in check.args


def test_spool_is_a_volume_owned_by_the_user() -> None:
    runtime = runtime_stage()
    spool = runtime.env()["INGESTER_SPOOL_DIR"]
    volumes = runtime.last("VOLUME").exec_form()
    assert volumes == [spool]
    uid, gid = dockerfile_user()
    creates = [i.args for i in runtime.all("RUN") if spool in i.args]
    assert any(f"-o {uid}" in run and f"-g {gid}" in run for run in creates), creates
    assert spool != str(setting_default("spool_dir")), "the image moves the spool off /tmp"


def test_dockerignore_keeps_secrets_and_clutter_out_and_the_build_inputs_in() -> None:
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".dev/keys/private.pem",
        ".env",
        "tests/conftest.py",
        "bench/run_all.py",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/content",
        "artstore_ingester.egg-info/PKG-INFO",
        "ingester/__pycache__/cli.cpython-311.pyc",
        "ingester/http/__pycache__/app.cpython-311.pyc",
    ):
        assert dockerignore_excludes(path), f"{path} would be sent to the build"
    for path in ("pyproject.toml", "README.md", "ingester/cli.py", "ingester/http/app.py"):
        assert not dockerignore_excludes(path), f"{path} is needed by the build"
    # Whatever the Dockerfile copies from the context is in the context.
    for stage in dockerfile_stages():
        for copy in stage.all("COPY"):
            words = [word for word in copy.args.split() if not word.startswith("--")]
            if "--from=" in copy.args:
                continue
            for source in words[:-1]:
                assert (REPO / source).exists(), source
                assert not dockerignore_excludes(source), f"COPY {source} is ignored"


def test_dockerignore_matching_follows_docker_rules() -> None:
    # The matcher above is ours: check it on the rules it relies on.
    assert dockerignore_excludes("anything/at/all")
    assert not dockerignore_excludes("ingester/deep/module.py")
    assert dockerignore_excludes("ingester/deep/__pycache__/module.cpython-311.pyc")
