"""The ansible-core versions the collection claims are the versions tested (noxfile.py).

``requires_ansible`` in meta/runtime.yml and the ``ansible-core`` bound in pyproject.toml name the same release
lines as noxfile.py. The newest line is the one the test venv runs: the README's test command runs every unit test
and ``ansible-test sanity`` (scripts/sanity) on it. Here ``ansible-test units`` runs on the oldest line, the one a
newer idiom breaks first. The lines between cost ~2.5 min each on a 2-core machine, so they run when
``HPCI_VERSION_MATRIX=all`` is set, and ``nox -s units`` / ``nox -s sanity`` run every line for a contributor.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
from noxfile import CORE_LINES  # noqa: E402


def _next(line: str) -> str:
    major, minor = line.split(".")
    return f"{major}.{int(minor) + 1}"


def test_the_claims_are_the_tested_lines():
    runtime = yaml.safe_load((REPO / "meta" / "runtime.yml").read_text())
    assert runtime["requires_ansible"] == f">={CORE_LINES[0]}.0,<{_next(CORE_LINES[-1])}.0"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"ansible-core>={CORE_LINES[0]},<{_next(CORE_LINES[-1])}"' in pyproject
    lines = [f"2.{n}" for n in range(int(CORE_LINES[0].split(".")[1]), int(CORE_LINES[-1].split(".")[1]) + 1)]
    assert list(CORE_LINES) == lines, "every line between the bounds is tested"


def nox(*sessions: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", NO_COLOR="1")
    env.pop("ANSIBLE_COLLECTIONS_PATH", None)
    argv = [str(BIN / "nox"), "--no-color"]
    for session in sessions:
        argv += ["-s", session]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600, check=False)


MATRIX = CORE_LINES[:-1] if os.environ.get("HPCI_VERSION_MATRIX") == "all" else CORE_LINES[:1]


@pytest.mark.parametrize("core", MATRIX)
def test_ansible_test_units_pass_on_each_line(core):
    cp = nox(f"units(core='{core}')")
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-6000:]
    passed = [int(n) for n in re.findall(r"=+ (\d+) passed in", out)]
    assert passed and sum(passed) > 1000, passed  # ansible-test ran the unit tests, not an empty selection
    assert "failed" not in " ".join(re.findall(r"=+ .* in [\d.]+s.*=+", out))
