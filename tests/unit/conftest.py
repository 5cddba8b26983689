"""The one way the unit tests run a module: ``run_module("free_port", {...})``.

A module runs as Ansible runs a shipped one: a fresh Python, ``python -m <module> args.json`` with the
arguments under ``ANSIBLE_MODULE_ARGS``, and its result read as JSON from stdout. The child imports what
this process imports: the collection tree first, then this interpreter's ``sys.path`` (``ansible-test
units`` puts ansible-core on ``sys.path``, not in the venv).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _ports

# .../ansible_collections/hpc/interactive/plugins/module_utils/_ports.py -> the tree holding ansible_collections
COLLECTIONS = str(Path(os.path.abspath(_ports.__file__)).parents[5])
PACKAGE = "ansible_collections.hpc.interactive.plugins.modules."


def module_result(module: str, args: dict, *, cwd, check: bool = False, diff: bool = False, env: dict | None = None,
                  timeout: float = 120, code: str | None = None) -> dict:
    """The result of module ``module`` (its short name) run with ``args``; ``_rc`` is its exit status.

    With ``code``, that Python source runs in the module's place (``python -c code args.json``) and ``module``
    only names it in messages.
    """
    payload = dict(args, _ansible_check_mode=check, _ansible_diff=diff)
    argsfile = Path(cwd) / f"args-{uuid.uuid4().hex[:12]}.json"
    argsfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": payload}))
    run_env = dict(os.environ, PYTHONPATH=os.pathsep.join([COLLECTIONS, *sys.path]), LC_ALL="C", **(env or {}))
    entry = ["-c", code] if code is not None else ["-m", PACKAGE + module]
    proc = subprocess.run([sys.executable, *entry, str(argsfile)], capture_output=True, text=True,
                          cwd=str(cwd), env=run_env, timeout=timeout, check=False)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"{module} printed no JSON (rc={proc.returncode}): {proc.stdout!r} {proc.stderr!r}")
    result["_rc"] = proc.returncode
    return result


@pytest.fixture
def run_module(tmp_path):
    """``run_module(module, args, check=, diff=, env=, timeout=, cwd=tmp_path, code=)`` -> the result dict."""

    def run(module: str, args: dict, *, check: bool = False, diff: bool = False, env: dict | None = None,
            timeout: float = 120, cwd=None, code: str | None = None) -> dict:
        return module_result(module, args, cwd=cwd or tmp_path, check=check, diff=diff, env=env, timeout=timeout,
                             code=code)

    return run


@pytest.fixture
def wait_for():
    """``wait_for(condition, timeout)``: True as soon as ``condition()`` is true (asked every 20 ms), else its last
    answer once ``timeout`` seconds have passed."""

    def wait(condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.02)
        return bool(condition())

    return wait
