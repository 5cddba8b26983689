"""One session vocabulary: the module_utils, the lookup the roles read it through, the CLI and the playbooks agree.

The id rule has one length limit (``isession-<id>`` is at most 64 characters): a 55-character id is taken by
the CLI and by the playbooks alike; a 56-, 60- and 65-character id is refused by both, each naming the input
the user gave (``--id``, ``session_id``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.lookup.session_vocabulary import LookupModule
from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state, _vocabulary

REPO = Path(__file__).resolve().parents[4]
COLLECTIONS = REPO / ".cache" / "collections"  # tests/conftest.py links the checkout there
sys.path.insert(0, str(REPO / "src"))
from isession import config  # noqa: E402
from isession.config import UsageError  # noqa: E402


def _id(length: int) -> str:
    return ("a1b2c3d4e5" * 7)[:length]


def test_the_table_covers_every_step_and_status():
    assert set(_vocabulary.STATUS_OF_STEP) == set(_vocabulary.STEPS)
    assert set(_vocabulary.STATUS_OF_STEP.values()) == set(_vocabulary.JOB_STATUSES)
    assert set(_vocabulary.TERMINAL_STATUSES) == {_vocabulary.STATUS_OF_STEP[s] for s in _vocabulary.TERMINAL_STEPS}
    for status, step in _vocabulary.STEP_OF_STATUS.items():
        assert _vocabulary.STATUS_OF_STEP[step] == status
    assert not set(_vocabulary.LIVE_STEPS) & set(_vocabulary.TERMINAL_STEPS)


def test_the_others_use_it_rather_than_a_copy():
    assert _state.STEPS is _vocabulary.STEPS and _state.TERMINAL_STEPS is _vocabulary.TERMINAL_STEPS
    assert _state.ID_RE is _vocabulary.ID_RE and _service_file.JOB_STATUSES is _vocabulary.JOB_STATUSES
    assert config.TERMINAL_STATUSES is _vocabulary.TERMINAL_STATUSES and config.SESSION_ID_RE is _vocabulary.ID_RE


@pytest.mark.parametrize(("length", "ok"), [(1, True), (55, True), (56, False), (60, False), (65, False)])
def test_id_limit_is_one_for_module_utils_and_cli(length, ok):
    sid = _id(length)
    assert len(_vocabulary.job_name(sid)) == length + len("isession-")
    if ok:
        assert _vocabulary.check_id(sid) == sid == config.check_session_id(sid) == _state.validate_id(sid)
        return
    with pytest.raises(_vocabulary.IdError, match="^session_id must be 1-55 characters"):
        _vocabulary.check_id(sid)
    with pytest.raises(UsageError, match="^--id: .* must be 1-55 characters"):
        config.check_session_id(sid)
    with pytest.raises(_state.StateError, match="1-55 characters"):
        _state.validate_id(sid)


def test_lookup_returns_the_vocabulary():
    whole = LookupModule().run([])
    assert whole == [_vocabulary.as_dict()]
    assert LookupModule().run(["id_max_length", "terminal_steps"]) == [55, ["cancelled", "completed", "failed"]]
    with pytest.raises(Exception, match="unknown session_vocabulary entries nope"):
        LookupModule().run(["nope"])


def _play(tmp_path: Path, playbook: str, extra: dict) -> subprocess.CompletedProcess:
    ev = tmp_path / "extra.json"
    ev.write_text(json.dumps(extra))
    ev.chmod(0o600)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="False",
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
    # next to this python, else on PATH (ansible-test units puts ansible-core's commands on PATH, not in its venv)
    playbook_cmd = Path(sys.executable).with_name("ansible-playbook")
    if not playbook_cmd.exists():
        playbook_cmd = Path(shutil.which("ansible-playbook") or playbook_cmd)
    return subprocess.run([str(playbook_cmd), "-i", "localhost,", "-c", "local", playbook,
                           "-e", f"@{ev}", "-e", "ansible_python_interpreter=" + sys.executable],
                          capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path, check=False)


@pytest.mark.parametrize(("playbook", "length"), [
    ("hpc.interactive.start_nginx", 56), ("hpc.interactive.start_nginx", 60), ("hpc.interactive.start_nginx", 65),
    ("hpc.interactive.cancel", 60), ("hpc.interactive.cancel", 65),
])
def test_playbooks_refuse_what_the_cli_refuses_naming_the_input(tmp_path, playbook, length):
    root = tmp_path / "sessions"
    cp = _play(tmp_path, playbook, {"session_id": _id(length), "session_root": str(root)})
    assert cp.returncode != 0
    assert "session_id must" in cp.stdout and "1-55 characters" in cp.stdout, cp.stdout[-2000:]
    assert not root.exists() or not any(root.iterdir())  # nothing made


def test_cancel_playbook_takes_a_55_character_id(tmp_path):
    """Accepted by the id check (then reports the unknown session, as for any id that names nothing)."""
    cp = _play(tmp_path, "hpc.interactive.cancel", {"session_id": _id(55), "session_root": str(tmp_path / "s")})
    assert "session_id must" not in cp.stdout, cp.stdout[-2000:]
