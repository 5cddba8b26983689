"""Helpers for the isession tests: the CLI's source on sys.path and a throw-away collection tree."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
FAKE = Path(__file__).resolve().parent / "fixtures" / "fakecol"
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


@pytest.fixture
def fake_collection(tmp_path: Path) -> Path:
    """A collection root holding hpc.interactive with the checkout's plugins and the fake playbooks."""
    root = tmp_path / "collections"
    col = root / "ansible_collections" / "hpc" / "interactive"
    col.mkdir(parents=True)
    (col / "plugins").symlink_to(REPO / "plugins")
    (col / "galaxy.yml").write_text("namespace: hpc\nname: interactive\nversion: 0.0.1\n")
    shutil.copytree(FAKE / "playbooks", col / "playbooks")
    if (REPO / "roles").is_dir():
        (col / "roles").symlink_to(REPO / "roles")
    return root


@pytest.fixture
def cli_env(tmp_path: Path, fake_collection: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Environment for running the CLI (in-process or as ``python -m isession``) against the fake collection."""
    env = {
        "ISESSION_COLLECTIONS": str(fake_collection),
        "ISESSION_ROOT": str(tmp_path / "sessions"),
        "HOME": str(tmp_path / "home"),
        # the CLI's process imports what this one does (ansible-test units puts ansible-core on sys.path only)
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path]),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    (tmp_path / "home").mkdir()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ISESSION_INVENTORY", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    return env
