"""Shell completion through argcomplete's own protocol (what bash's completion function sends)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def complete(env: dict, line: str, tmp_path: Path) -> list:
    out = tmp_path / "completions"
    full = {**os.environ, **env, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
            "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
    cp = subprocess.run([sys.executable, "-m", "isession"], env=full, capture_output=True, text=True, timeout=60,
                        check=False)
    assert cp.returncode == 0, cp.stderr
    return out.read_text().split("\n") if out.exists() else []


def test_services_inputs_and_session_ids_complete(cli_env, tmp_path):
    assert complete(cli_env, "isession start ", tmp_path)[-1:] == ["fake"]  # options first, then the services
    got = complete(cli_env, "isession start fake -e session_wall", tmp_path)
    assert got == ["session_walltime="]
    root = Path(cli_env["ISESSION_ROOT"])
    for sid in ("lab-1", "lab-2", "other"):
        (root / sid).mkdir(parents=True)
    assert sorted(complete(cli_env, "isession cancel lab", tmp_path)) == ["lab-1", "lab-2"]


def test_completion_never_breaks_without_a_collection(cli_env, tmp_path):
    env = dict(cli_env, ISESSION_COLLECTIONS=str(tmp_path / "nothing"))
    assert complete(env, "isession describe ", tmp_path) == ["-h", "--help", "--json"]  # no services, no error
