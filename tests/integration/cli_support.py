"""Helpers (no tests): run the isession CLI on the bed as a non-root user (for test_cli*, test_watcher*)."""
from __future__ import annotations

import json
import os
import pwd
import shutil
from pathlib import Path
from typing import Dict, Optional

from sessions_common import stop_watcher

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = REPO / "playbooks"


class Cli:
    """``isession`` for one bed user: its own copy of src/isession, session root and inventory."""

    def __init__(self, bed, user: str = "wsuser", inventory: Optional[Path] = None) -> None:
        self.bed, self.user = bed, user
        self.home = Path(pwd.getpwnam(user).pw_dir)
        self.tmp = bed.user_tmpdir(user)
        src = self.tmp / "src"
        shutil.copytree(REPO / "src" / "isession", src / "isession",
                        ignore=shutil.ignore_patterns("__pycache__"))
        self.root = self.tmp / "sessions"
        pw = pwd.getpwnam(user)
        for dirpath, _dirs, files in os.walk(src):
            os.chown(dirpath, pw.pw_uid, pw.pw_gid)
            for name in files:
                os.chown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid)
        self.env: Dict[str, str] = {
            "PYTHONPATH": str(src),
            "ISESSION_COLLECTIONS": str(bed.collections_path),
            "ISESSION_ROOT": str(self.root),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
        }
        if inventory is not False:
            self.env["ISESSION_INVENTORY"] = str(inventory or bed.inventory_path)

    def run(self, *args: str, timeout: float = 300, check_rc: Optional[int] = None):
        cp = self.bed.run("workspace", [str(self.bed.venv / "bin" / "python"), "-m", "isession", *args],
                          user=self.user, env=self.env, timeout=timeout)
        if check_rc is not None:
            assert cp.returncode == check_rc, \
                f"isession {' '.join(args)} -> rc {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
        return cp

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "--json", check_rc=0).stdout)

    def service(self, sid: str) -> dict:
        return json.loads((self.root / sid / "service.json").read_text())

    def state(self, sid: str) -> dict:
        return json.loads((self.root / sid / "state.json").read_text())

    def watcher_log(self) -> str:
        path = self.root / ".watcher.log"
        return path.read_text() if path.exists() else "(no watcher log)"

    def stop_watcher(self) -> None:
        stop_watcher(self.root)


def files_containing(top: Path, needle: str):
    hits = []
    for path in top.rglob("*"):
        if path.is_file() and not path.is_symlink() and needle in path.read_text(errors="replace"):
            hits.append(path)
    return hits
