"""The session_state module, run for real as Ansible runs it (args file, module entry point)."""
from __future__ import annotations

import json
import stat

import pytest


def test_create_then_idempotent_and_secret_never_returned(tmp_path, run_module):
    root = tmp_path / "sessions"
    args = {"op": "create", "id": "s1", "root": str(root), "service": "nginx", "target": "workspace", "url": "/me"}
    res = run_module("session_state", args, diff=True)
    assert res["changed"] is True and res["exists"] is False, res
    d = root / "s1"
    assert res["dir"] == str(d) and res["secret_path"] == str(d / "secret")
    assert res["record"]["service"] == "nginx" and res["record"]["step"] == "created"
    secret = (d / "secret").read_text().strip()
    assert stat.S_IMODE((d / "secret").stat().st_mode) == 0o600 and stat.S_IMODE(d.stat().st_mode) == 0o700
    assert secret not in json.dumps(res)
    assert res["diff"]["before"] == "" and json.loads(res["diff"]["after"]) == res["record"]
    again = run_module("session_state", args)
    assert again["changed"] is False and again["exists"] is True and "diff" not in again
    assert (d / "secret").read_text().strip() == secret


def test_check_mode_create_predicts_and_writes_nothing(tmp_path, run_module):
    res = run_module("session_state", {"op": "create", "id": "s1", "root": str(tmp_path / "r")}, check=True, diff=True)
    assert res["changed"] is True and res["record"]["step"] == "created"
    assert not (tmp_path / "r").exists()


def test_update_merges_and_appends_history(tmp_path, run_module):
    base = {"id": "s1", "root": str(tmp_path)}
    run_module("session_state", dict(base, op="create"))
    res = run_module("session_state", dict(base, step="ports_reserved", ports={"workspace": 23456}), diff=True)
    assert res["changed"] is True and res["record"]["ports"] == {"workspace": 23456}
    assert json.loads(res["diff"]["before"])["step"] == "created"
    res = run_module("session_state", dict(base, step="running", job_id="77", pids={"agent": 1234}))
    rec = json.loads((tmp_path / "s1" / "state.json").read_text())
    assert rec == res["record"] and [h["step"] for h in rec["history"]] == ["created", "ports_reserved", "running"]
    assert run_module("session_state", dict(base, step="running", job_id="77"))["changed"] is False
    check = run_module("session_state", dict(base, step="failed", error="x"), check=True)
    assert check["changed"] is True and check["record"]["step"] == "failed"
    assert json.loads((tmp_path / "s1" / "state.json").read_text())["step"] == "running"


def test_terminal_step_is_final(tmp_path, run_module):
    base = {"id": "s1", "root": str(tmp_path)}
    run_module("session_state", dict(base, op="create"))
    assert run_module("session_state", dict(base, step="cancelled"))["changed"] is True
    res = run_module("session_state", dict(base, step="running"))
    assert res["failed"] is True and res["field"] == "step" and "already ended (cancelled)" in res["msg"]


def test_cancel_and_read(tmp_path, run_module):
    base = {"id": "s1", "root": str(tmp_path)}
    read = run_module("session_state", dict(base, op="read"))
    assert read["changed"] is False and read["exists"] is False and read["record"] == {}
    run_module("session_state", dict(base, op="create", service="nginx"))
    res = run_module("session_state", dict(base, op="cancel"))
    assert res["changed"] is True and res["record"]["cancel_requested"] is True
    assert run_module("session_state", dict(base, op="cancel"))["changed"] is False
    read = run_module("session_state", dict(base, op="read"))
    assert read["exists"] is True and read["record"]["cancel_requested"] is True and read["changed"] is False
    refused = run_module("session_state", dict(base, op="create"))
    assert refused["failed"] is True and refused["field"] == "id"


def test_bad_values_fail_naming_the_field(tmp_path, run_module):
    res = run_module("session_state", {"op": "create", "id": "../x", "root": str(tmp_path)})
    assert res["failed"] is True and res["field"] == "id"
    res = run_module("session_state", {"op": "create", "id": "s1", "root": str(tmp_path), "ports": {"workspace": -1}})
    assert res["failed"] is True and res["field"] == "ports"
    res = run_module("session_state", {"op": "create", "id": "s1", "root": str(tmp_path), "step": "nope"})
    assert res["failed"] is True and "step" in res["msg"]
    res = run_module("session_state", {"op": "update", "id": "missing", "root": str(tmp_path), "step": "running"})
    assert res["failed"] is True and res["field"] == "id"


def test_default_root_uses_xdg_state_home(tmp_path, run_module):
    res = run_module("session_state", {"op": "create", "id": "s1"}, env={"XDG_STATE_HOME": str(tmp_path / "xdg")})
    assert res["dir"] == str(tmp_path / "xdg" / "isession" / "sessions" / "s1")
    assert (tmp_path / "xdg" / "isession" / "sessions" / "s1" / "state.json").is_file()


# ----------------------------------------------------------------------------- watch
WATCH = {"inventory": "/home/u/.config/isession/inventory.yml", "resource": "controller", "walltime": "60"}


def test_watch_written_0600_with_create_and_only_changed_when_different(tmp_path, run_module):
    base = {"id": "s1", "root": str(tmp_path)}
    res = run_module("session_state", dict(base, op="create", service="nginx", watch=WATCH))
    assert res["changed"] is True and not res.get("failed"), res
    watch = tmp_path / "s1" / "watch.json"
    assert json.loads(watch.read_text()) == WATCH and stat.S_IMODE(watch.stat().st_mode) == 0o600
    assert watch.read_text() == json.dumps(WATCH, sort_keys=True) + "\n"
    # same record, same watch (keys in another order): nothing to do
    again = run_module("session_state",
                       dict(base, op="create", service="nginx", watch=dict(reversed(list(WATCH.items())))))
    assert again["changed"] is False, again
    inode = watch.stat().st_ino
    assert run_module("session_state", dict(base, watch=WATCH))["changed"] is False
    assert watch.stat().st_ino == inode  # not even rewritten
    # only the watch differs: changed, the record is untouched
    state_before = (tmp_path / "s1" / "state.json").read_text()
    res = run_module("session_state", dict(base, watch=dict(WATCH, walltime="120")))
    assert res["changed"] is True and json.loads(watch.read_text())["walltime"] == "120"
    assert (tmp_path / "s1" / "state.json").read_text() == state_before
    assert stat.S_IMODE(watch.stat().st_mode) == 0o600


def test_watch_with_update_and_other_changes(tmp_path, run_module):
    base = {"id": "s1", "root": str(tmp_path)}
    run_module("session_state", dict(base, op="create"))
    assert not (tmp_path / "s1" / "watch.json").exists()  # no watch given, none written
    res = run_module("session_state", dict(base, step="starting", watch=WATCH))
    assert res["changed"] is True and res["record"]["step"] == "starting"
    assert json.loads((tmp_path / "s1" / "watch.json").read_text()) == WATCH


def test_watch_check_mode_predicts_and_writes_nothing(tmp_path, run_module):
    base = {"id": "s1", "root": str(tmp_path / "r")}
    res = run_module("session_state", dict(base, op="create", watch=WATCH), check=True)
    assert res["changed"] is True and not (tmp_path / "r").exists()
    run_module("session_state", dict(base, op="create", watch=WATCH))
    watch = tmp_path / "r" / "s1" / "watch.json"
    before = watch.read_text()
    res = run_module("session_state", dict(base, watch=dict(WATCH, resource="compute")), check=True)
    assert res["changed"] is True and watch.read_text() == before
    assert run_module("session_state", dict(base, watch=WATCH), check=True)["changed"] is False


@pytest.mark.parametrize("op", ["read", "cancel"])
def test_watch_ignored_by_read_and_cancel(tmp_path, op, run_module):
    base = {"id": "s1", "root": str(tmp_path)}
    run_module("session_state", dict(base, op="create"))
    res = run_module("session_state", dict(base, op=op, watch=WATCH))
    assert not res.get("failed") and not (tmp_path / "s1" / "watch.json").exists(), res
    assert res["changed"] is (op == "cancel")


def test_watch_not_written_for_a_missing_session(tmp_path, run_module):
    res = run_module("session_state", {"id": "gone", "root": str(tmp_path), "missing_ok": True, "step": "running",
                                       "watch": WATCH})
    assert not res.get("failed") and res["changed"] is False and res["exists"] is False, res
    assert not (tmp_path / "gone").exists()


def test_watch_that_cannot_be_written_fails_naming_the_field(tmp_path, run_module):
    base = {"id": "s1", "root": str(tmp_path)}
    run_module("session_state", dict(base, op="create"))
    (tmp_path / "s1" / "watch.json").mkdir()
    res = run_module("session_state", dict(base, watch=WATCH))
    assert res["failed"] is True and res["field"] == "watch" and "watch.json" in res["msg"], res


def test_watch_json_as_a_symlink_is_never_written_through_and_does_not_crash(tmp_path, run_module):
    base = {"id": "s1", "root": str(tmp_path)}
    run_module("session_state", dict(base, op="create"))
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not yours\n")
    (tmp_path / "s1" / "watch.json").symlink_to(elsewhere)
    res = run_module("session_state", dict(base, watch=WATCH))  # a module answer (JSON), not a traceback
    assert elsewhere.read_text() == "not yours\n"
    assert not res.get("failed") or res.get("field") == "watch", res
