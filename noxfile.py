"""The version matrix: every ansible-core release line that runs on this machine's Python (3.11), 2.16 to 2.19.

These are the lines meta/runtime.yml (``requires_ansible``) and pyproject.toml (the ``ansible-core`` bound) claim;
2.20 needs Python 3.12. Each session installs one line in a venv of its own and runs ``ansible-test`` from it on
a copy of this checkout (git's tracked and new files, at the ``ansible_collections/hpc/interactive`` path
ansible-test needs), with ``--venv`` for the tests' own requirements, as a contributor runs it:

    nox -s units            # ansible-test units (every unit test) on every line
    nox -s "units(core='2.16')"
    nox -s sanity           # ansible-test sanity on every line
    nox -l                  # the sessions

The sessions use the interpreter nox runs with (a venv of the system Python), so nothing is downloaded but the
packages; ``scripts/pip_bootstrap.py`` stands in for the pip bootstrap script ansible-test would download.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import nox

REPO = Path(__file__).resolve().parent
CORE_LINES = ("2.16", "2.17", "2.18", "2.19")
PYTHON = "3.11"

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["units"]


def _install_core(session: nox.Session, core: str) -> Path:
    major, minor = core.split(".")
    session.install(f"ansible-core>={core},<{major}.{int(minor) + 1}")
    site = session.run("python", "-c", "import ansible_test, os; print(os.path.dirname(ansible_test.__file__))",
                       silent=True)
    return Path(str(site).strip())


def _pip_bootstrap(ansible_test: Path) -> None:
    """Put the stand-in of ansible-test's pip bootstrap script where ansible-test looks for a downloaded one."""
    versions = set()
    for name in ("constraints.txt", "ansible-test.txt"):  # where 2.18 and newer pin it
        path = ansible_test / "_data" / "requirements" / name
        if path.is_file():
            versions |= {line.split("==", 1)[1].strip() for line in path.read_text().splitlines()
                         if line.startswith("pip==")}
    pinned = ansible_test / "_internal" / "python_requirements.py"  # where 2.16 and 2.17 pin it
    if pinned.is_file():
        versions |= set(re.findall(r"\bpip='([0-9.]+)'", pinned.read_text()))
    cache = Path.home() / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for version in versions or {"24.2"}:
        shutil.copyfile(REPO / "scripts" / "pip_bootstrap.py", cache / f"get_pip_{version.replace('.', '_')}.py")


def _checkout_copy(session: nox.Session) -> Path:
    """This checkout's files (tracked and new, not ignored) under <tmp>/ansible_collections/hpc/interactive."""
    dest = Path(session.create_tmp()) / "ansible_collections" / "hpc" / "interactive"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_symlink() or src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    # ansible-test lists a collection's files with git when it is a repository
    env = {**os.environ, "GIT_AUTHOR_NAME": "nox", "GIT_AUTHOR_EMAIL": "nox@localhost",
           "GIT_COMMITTER_NAME": "nox", "GIT_COMMITTER_EMAIL": "nox@localhost"}
    for argv in (["git", "init", "-q", "."], ["git", "add", "-A"], ["git", "commit", "-qm", "checkout copy"]):
        subprocess.run(argv, cwd=dest, check=True, env=env)
    return dest


def _ansible_test(session: nox.Session, core: str, args: list) -> None:
    ansible_test = _install_core(session, core)
    _pip_bootstrap(ansible_test)
    dest = _checkout_copy(session)
    with session.chdir(dest):
        session.run("ansible-test", *args, "--python", PYTHON, "--venv", "--color", "no", *session.posargs)


# python=None: a venv of the interpreter nox runs with
@nox.session(python=None, venv_backend="venv")
@nox.parametrize("core", CORE_LINES)
def units(session: nox.Session, core: str) -> None:
    """ansible-test units (every unit test) on a copy of the checkout, with one ansible-core line."""
    _ansible_test(session, core, ["units"])


@nox.session(python=None, venv_backend="venv")
@nox.parametrize("core", CORE_LINES)
def sanity(session: nox.Session, core: str) -> None:
    """ansible-test sanity on a copy of the checkout, with one ansible-core line."""
    _ansible_test(session, core, ["sanity"])
