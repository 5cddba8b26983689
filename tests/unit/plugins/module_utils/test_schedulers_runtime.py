"""Scheduler commands outside the non-login PATH: ``scheduler_path`` and ``scheduler_env`` (``_runtime``).

Real sites put Grid Engine under ``/opt/sge/bin/<arch>`` with ``SGE_ROOT``/``SGE_CELL`` set by a login profile that
an SSH module run never reads. The runner finds the commands there first, puts that directory first on their
PATH and adds the variables; bad values are refused naming the field. Commands run for real (small scripts).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._runtime import (
    find_in,
    make_runner,
    scheduler_setup,
)

TEST_FILE = Path(__file__).resolve()


def tool(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_setup_keeps_good_values_as_strings():
    dirs, env = scheduler_setup(["/opt/sge/bin/lx-amd64/", "/usr/local/pbs/bin"],
                                {"SGE_ROOT": "/opt/sge", "SGE_CELL": "default", "SGE_QMASTER_PORT": 6444})
    assert dirs == ["/opt/sge/bin/lx-amd64", "/usr/local/pbs/bin"]
    assert env == {"SGE_ROOT": "/opt/sge", "SGE_CELL": "default", "SGE_QMASTER_PORT": "6444"}
    assert scheduler_setup(None, None) == ([], {})


@pytest.mark.parametrize("path, env, field, words", [
    (["relative/bin"], {}, "scheduler_path", "absolute"),
    (["/opt/a:/opt/b"], {}, "scheduler_path", "without ':'"),
    (["/opt/bin\n"], {}, "scheduler_path", "newline"),
    ([], {"PATH": "/opt/sge/bin"}, "scheduler_env", "use scheduler_path"),
    ([], {"LC_ALL": "de_DE.UTF-8"}, "scheduler_env", "locale stays C"),
    ([], {"LC_TIME": "de_DE.UTF-8"}, "scheduler_env", "locale stays C"),
    ([], {"1BAD": "x"}, "scheduler_env", "not an environment variable name"),
    ([], {"SGE ROOT": "x"}, "scheduler_env", "not an environment variable name"),
    ([], {"SGE_ROOT": None}, "scheduler_env", "string or number"),
    ([], {"SGE_ROOT": ["/opt"]}, "scheduler_env", "string or number"),
    ([], {"SGE_ROOT": "/opt\nPATH=/tmp"}, "scheduler_env", "one line"),
    ([], ["SGE_ROOT=/opt"], "scheduler_env", "mapping"),
])
def test_setup_refuses_bad_values_naming_the_field(path, env, field, words):
    with pytest.raises(ValueError) as exc:
        scheduler_setup(path, env)
    assert str(exc.value).startswith(field + ":") and words in str(exc.value), exc.value


def test_find_in_takes_the_first_executable(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    (first).mkdir()
    (first / "qstat").write_text("not executable")
    want = tool(second, "qstat", "exit 0\n")
    assert find_in([str(first), str(second)], "qstat") == str(want)
    assert find_in([str(first)], "qstat") is None


def test_runner_uses_the_scheduler_dir_first_with_its_environment(tmp_path, monkeypatch):
    site = tmp_path / "sge" / "bin"
    # a qstat that answers only with the cell's variables, and calls a sibling through PATH like real wrappers do
    tool(site, "qstat", 'echo "root=$SGE_ROOT cell=$SGE_CELL lc=$LC_ALL"; helper\n')
    tool(site, "helper", 'echo "sibling found"\n')
    shadow = tool(tmp_path / "usrbin", "qstat", 'echo "the wrong qstat"; exit 3\n')  # another scheduler's qstat
    monkeypatch.setenv("PATH", f"{shadow.parent}{os.pathsep}{os.environ['PATH']}")
    marker = uuid.uuid4().hex
    run = make_runner(lambda name: None, [str(site)], {"SGE_ROOT": "/opt/sge-" + marker, "SGE_CELL": "default"})
    out = run(["qstat", "-xml"], 10)
    assert out.rc == 0, out
    assert out.stdout.splitlines() == [f"root=/opt/sge-{marker} cell=default lc=C", "sibling found"]
    assert f"SGE_ROOT=/opt/sge-{marker}" not in " ".join(out.argv)  # in the environment, not the argv
    assert "SGE_ROOT" not in os.environ  # the module's own environment is untouched


def test_runner_without_a_scheduler_dir_resolves_as_before(tmp_path):
    found = tool(tmp_path / "bin", "squeue", 'echo "from $0"\n')
    seen = []
    run = make_runner(lambda name: seen.append(name) or str(found))
    out = run(["squeue", "--json"], 10)
    assert seen == ["squeue"] and out.stdout.strip() == f"from {found}"
    assert run([str(found)], 10).stdout.strip() == f"from {found}"  # an absolute argv[0] is used as it is
    assert seen == ["squeue"]
