"""Scheduler commands outside the non-login PATH: ``scheduler_path`` and ``scheduler_env`` (``_runtime``).

Real sites put Grid Engine under ``/opt/sge/bin/<arch>`` with ``SGE_ROOT``/``SGE_CELL`` set by a login profile that
an SSH module run never reads. The runner finds the commands there first, puts that directory first on their
PATH and adds the variables; bad values are refused naming the field. Commands run for real (small scripts).
"""
from __future__ import annotations

import os
import stat as _stat
import uuid
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._runtime import (
    find_in,
    make_runner,
    path_problem,
    private_dir_problem,
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


# ---------------------------------------------------------------- who could change a session directory's path
D, L = _stat.S_IFDIR, _stat.S_IFLNK
# a small file system: path -> (type and mode, owner, symlink target)
FS = {
    "/": (D | 0o755, 0, None), "/home": (D | 0o755, 0, None), "/home/u": (D | 0o700, 1000, None),
    "/tmp": (D | 0o1777, 0, None), "/tmp/x": (D | 0o1777, 2000, None), "/tmp/mine": (D | 0o700, 1000, None),
    "/scratch": (D | 0o777, 0, None), "/grp": (D | 0o2775, 0, None), "/link": (L | 0o777, 0, "/home/u"),
    "/tmp/evil": (L | 0o777, 2000, "/home/u"), "/tmp/bobs": (D | 0o755, 2000, None),
}


def fake_lstat(path):
    if path not in FS:
        raise FileNotFoundError(path)
    mode, uid, _ignored = FS[path]
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


def fake_realpath(path):
    parts, out = [p for p in path.split("/") if p], "/"
    for part in parts:
        out = os.path.join(out, part)
        while out in FS and FS[out][2]:
            out = FS[out][2]
    return out


def fake_stat(path):
    return fake_lstat(fake_realpath(path))


@pytest.mark.parametrize("path, problem", [
    ("/home/u/.isession/sessions", None),       # the default remote root: the user's home
    ("/tmp/mine/sessions", None),               # the user's own directory in root's sticky /tmp
    ("/tmp", None),
    ("/link/sessions", None),                   # a root-owned symlink to the user's home
    ("/tmp/x/sessions", "/tmp/x belongs to uid 2000"),      # a sticky directory another user made
    ("/tmp/bobs/sessions", "/tmp/bobs belongs to uid 2000"),
    ("/tmp/evil/sessions", "/tmp/evil (a symlink) belongs to uid 2000"),
    ("/scratch/sessions", "/scratch is writable by other users and not sticky"),
    ("/scratch", "/scratch is writable by other users and not sticky"),
    ("/grp/sessions", "/grp is writable by other users and not sticky"),  # group-writable counts too
])
def test_path_problem(path, problem):
    got = path_problem(path, 1000, lstat=fake_lstat, stat_=fake_stat, realpath=fake_realpath)
    assert got is None if problem is None else got.startswith(problem), got


@pytest.mark.parametrize("mode, uid, problem", [
    (D | 0o700, 1000, None),
    (D | 0o750, 1000, "mode 0750 (0700 expected)"),
    (D | 0o700, 2000, "belongs to uid 2000: another user may have put files (code) in it"),
    (L | 0o777, 1000, "is a symlink"),
    (_stat.S_IFREG | 0o600, 1000, "is not a directory"),
])
def test_private_dir_problem(mode, uid, problem):
    got = private_dir_problem(os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0)), 1000)
    assert got is None if problem is None else problem in got, got
