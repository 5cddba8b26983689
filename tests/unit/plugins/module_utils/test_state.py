"""_state: the session record's rules (steps, tombstone, merges), its files, and the readiness loop."""
from __future__ import annotations

import json
import os
import stat

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _state as S


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_default_root_follows_xdg_state_home():
    assert S.default_root({"XDG_STATE_HOME": "/x/state"}) == "/x/state/isession/sessions"
    assert S.default_root({}).endswith("/.local/state/isession/sessions")


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a/b", "../x", "x" * 65, "é", None, 3])
def test_bad_ids_are_refused(bad, tmp_path):
    with pytest.raises(S.StateError) as exc:
        S.session_paths(str(tmp_path), bad)
    assert exc.value.field == "id"


def test_relative_root_is_refused():
    with pytest.raises(S.StateError) as exc:
        S.session_paths("rel/root", "s1")
    assert exc.value.field == "root"


@pytest.mark.parametrize("field,value", [
    ("step", "runnin"), ("target", "cloud"), ("scheduler", "lsf"), ("url", "/x"), ("job_id", "1;rm"),
    ("ports", {"workspace": 0}), ("ports", {"workspace": True}), ("ports", {"bad key": 1}), ("ports", [1]),
    ("cancel_requested", "yes"), ("remote_dir", "a\nb"), ("nonsense", 1), ("service", "a b"),
])
def test_invalid_fields_name_the_field(field, value):
    with pytest.raises(S.StateError) as exc:
        S.validate_updates({field: value})
    assert exc.value.field == field


def test_merge_steps_history_ended_and_maps():
    rec = S.new_record("s1", 100.0)
    rec = S.merge(rec, S.validate_updates({"step": "ports_reserved", "ports": {"workspace": "23456"}}), 101.0)
    assert rec["ports"] == {"workspace": 23456} and rec["updated"] == 101.0 and rec["ended"] is None
    rec = S.merge(rec, S.validate_updates({"ports": {"node": 40000}, "pids": {"agent": 12}}), 102.0)
    assert rec["ports"] == {"workspace": 23456, "node": 40000} and rec["pids"] == {"agent": 12}
    rec = S.merge(rec, {"ports": {"node": None}}, 103.0)
    assert rec["ports"] == {"workspace": 23456}
    same = S.merge(rec, S.validate_updates({"ports": {"workspace": 23456}}), 999.0)
    assert same == rec and same["updated"] == 103.0  # no real change, updated untouched
    # a requeue may go back among non-terminal steps
    rec = S.merge(rec, {"step": "running"}, 104.0)
    rec = S.merge(rec, {"step": "queued"}, 105.0)
    rec = S.merge(rec, {"step": "failed", "error": "boom"}, 106.0)
    assert [h["step"] for h in rec["history"]] == ["created", "ports_reserved", "running", "queued", "failed"]
    assert rec["ended"] == 106.0
    assert S.merge(rec, {"step": "failed"}, 107.0) == rec  # the same terminal step again: no-op
    for step in ("running", "cancelled"):
        with pytest.raises(S.StateError, match="already ended") as exc:
            S.merge(rec, {"step": step}, 108.0)
        assert exc.value.field == "step"


def test_tombstone_cannot_be_unset_and_blocks_progress():
    rec = S.merge(S.new_record("s1", 1.0), {"cancel_requested": True}, 2.0)
    with pytest.raises(S.StateError, match="being cancelled") as exc:
        S.merge(rec, {"step": "starting"}, 3.0)
    assert exc.value.field == "step"
    assert S.merge(rec, {"step": "cancelled"}, 3.0)["step"] == "cancelled"
    assert S.merge(rec, {"job_id": "5"}, 3.0)["job_id"] == "5"  # fields other than the step still merge
    with pytest.raises(S.StateError) as exc:
        S.merge(rec, {"cancel_requested": False}, 3.0)
    assert exc.value.field == "cancel_requested"


def test_create_makes_private_dir_secret_and_record(tmp_path):
    root = str(tmp_path / "sessions")
    p = S.run_op("create", root, "s1", {"service": "nginx", "target": "workspace"}, now=10.0)
    assert p.changed and p.before is None
    d = tmp_path / "sessions" / "s1"
    assert mode(d) == 0o700 and mode(d / "logs") == 0o700 and mode(tmp_path / "sessions") == 0o700
    assert mode(d / "secret") == 0o600 and mode(d / "state.json") == 0o600
    secret = (d / "secret").read_text().strip()
    assert len(secret) >= 40 and secret not in (d / "state.json").read_text()
    rec = json.loads((d / "state.json").read_text())
    assert rec["service"] == "nginx" and rec["step"] == "created" and rec["schema"] == 1 and rec["id"] == "s1"
    again = S.run_op("create", root, "s1", {"service": "nginx", "target": "workspace"}, now=11.0)
    assert not again.changed and (d / "secret").read_text().strip() == secret  # secret kept


def test_secrets_differ_between_sessions(tmp_path):
    for sid in ("a", "b"):
        S.run_op("create", str(tmp_path), sid, {})
    assert (tmp_path / "a" / "secret").read_text() != (tmp_path / "b" / "secret").read_text()


def test_check_mode_touches_nothing(tmp_path):
    root = str(tmp_path / "sessions")
    p = S.run_op("create", root, "s1", {"service": "nginx"}, check=True)
    assert p.changed and p.make_secret and p.after["service"] == "nginx"
    assert not (tmp_path / "sessions").exists()
    S.run_op("create", root, "s1", {})
    before = (tmp_path / "sessions" / "s1" / "state.json").read_text()
    p = S.run_op("update", root, "s1", {"step": "running"}, check=True)
    assert p.changed and p.after["step"] == "running"
    assert (tmp_path / "sessions" / "s1" / "state.json").read_text() == before


def test_update_needs_a_record_unless_missing_ok(tmp_path):
    with pytest.raises(S.StateError, match="no record") as exc:
        S.run_op("update", str(tmp_path), "nope", {"step": "running"})
    assert exc.value.field == "id"
    p = S.run_op("update", str(tmp_path), "nope", {"step": "running"}, missing_ok=True)
    assert not p.changed and not (tmp_path / "nope").exists()


def test_cancel_tombstones_and_blocks_a_later_create(tmp_path):
    p = S.run_op("cancel", str(tmp_path), "race", {})
    assert p.changed and p.before is None and p.after["cancel_requested"] is True
    assert not (tmp_path / "race" / "secret").exists()
    assert not S.run_op("cancel", str(tmp_path), "race", {}).changed  # twice: nothing new
    with pytest.raises(S.StateError, match="was cancelled") as exc:
        S.run_op("create", str(tmp_path), "race", {"service": "nginx"})
    assert exc.value.field == "id"


def test_create_refuses_an_ended_session(tmp_path):
    S.run_op("create", str(tmp_path), "s1", {})
    S.run_op("update", str(tmp_path), "s1", {"step": "completed"})
    with pytest.raises(S.StateError, match="already ended"):
        S.run_op("create", str(tmp_path), "s1", {})
    with pytest.raises(S.StateError, match="already ended"):
        S.run_op("update", str(tmp_path), "s1", {"step": "running"})


def test_update_state_helper_for_cli_and_watcher(tmp_path):
    S.run_op("create", str(tmp_path), "s1", {})
    changed, rec = S.update_state(str(tmp_path), "s1", step="queued", job_id="42")
    assert changed and rec["job_id"] == "42"
    assert json.loads((tmp_path / "s1" / "state.json").read_text()) == rec


@pytest.mark.parametrize("text,msg", [
    ("not json", "not valid JSON"), ("[]", "not a JSON object"), ('{"schema": 9, "id": "s1"}', "schema 9"),
    ('{"schema": 1, "id": "s1", "step": "bogus"}', "invalid value"),
    ('{"schema": 1, "id": "s1", "history": [{"step": "x"}]}', "invalid history"),
])
def test_corrupt_records_are_reported(tmp_path, text, msg):
    (tmp_path / "s1").mkdir(mode=0o700)
    (tmp_path / "s1" / "state.json").write_text(text)
    with pytest.raises(S.StateError, match=msg) as exc:
        S.run_op("read", str(tmp_path), "s1")
    assert exc.value.field == "path"


def test_symlinked_session_dir_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "s1")
    with pytest.raises(S.StateError, match="symlinks are refused"):
        S.run_op("create", str(tmp_path), "s1", {})


def test_existing_secret_file_with_wrong_mode_is_fixed(tmp_path):
    path = tmp_path / "secret"
    path.write_text("abc\n")
    path.chmod(0o644)
    assert S.make_secret(str(path)) is False and mode(path) == 0o600 and path.read_text() == "abc\n"
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(S.StateError):
        S.make_secret(str(empty))


@pytest.mark.parametrize("status,ok", [(200, True), (302, True), (401, True), (403, True), (404, False),
                                       (500, False), (502, False), (None, False)])
def test_ready_status(status, ok):
    assert S.ready_status(status) is ok


def test_probe_url():
    assert S.probe_url(23456, "/me", "api/status") == "http://127.0.0.1:23456/me/23456/api/status"
    assert S.probe_url(23456, "/sme") == "https://127.0.0.1:23456/sme/23456/"
    for port, url, probe in ((0, "/me", ""), (23456, "/x", ""), (23456, "/me", "/abs"), (1, "/me", "../x")):
        with pytest.raises(S.StateError):
            S.probe_url(port, url, probe)


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.sleeps = []

    def clock(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_wait_ready_polls_until_ready():
    clk = FakeClock()
    answers = iter([(None, "refused"), (502, ""), (200, "")])
    ready, status, elapsed, msg = S.wait_ready(lambda: next(answers), 10, interval=0.2, clock=clk.clock,
                                               sleep=clk.sleep)
    assert (ready, status, msg) == (True, 200, "") and elapsed == pytest.approx(0.4) and clk.sleeps == [0.2, 0.2]


def test_wait_ready_times_out_with_words():
    clk = FakeClock()
    ready, status, elapsed, msg = S.wait_ready(lambda: (502, ""), 1, interval=0.3, clock=clk.clock, sleep=clk.sleep)
    assert not ready and status == 502 and elapsed == pytest.approx(1.0)
    assert msg == "no answer from the server after 1 s (last answer HTTP 502)"


def test_wait_ready_aborts_at_once():
    clk = FakeClock()
    calls = []
    ready, _ignored, _ignored, msg = S.wait_ready(
        lambda: (None, "refused"), 300, clock=clk.clock, sleep=clk.sleep,
        abort=lambda: calls.append(1) or (None if len(calls) < 3 else "cancelled"))
    assert not ready and msg == "cancelled" and len(calls) == 3 and clk.t < 1


def test_agent_error_and_process_alive(tmp_path):
    assert S.agent_error(str(tmp_path)) is None
    (tmp_path / "agent.error").write_text("nginx not found on compute1\nmore\n")
    assert S.agent_error(str(tmp_path)) == "nginx not found on compute1"
    assert S.process_alive(os.getpid()) and not S.process_alive(2 ** 22 + 1)


def test_update_with_expect_step_is_a_compare_and_set(tmp_path):
    root = str(tmp_path)
    S.run_op("create", root, "cas-1", {"service": "nginx", "target": "workspace"})
    S.update_state(root, "cas-1", step="starting")
    S.update_state(root, "cas-1", step="running")  # e.g. session_ready, between a watcher's read and write
    with pytest.raises(S.StateError, match="moved to step running") as exc:
        S.update_state(root, "cas-1", expect_step="starting", step="starting")
    assert exc.value.field == "step"
    assert S.read_record(os.path.join(root, "cas-1", "state.json"))["step"] == "running"
    changed, rec = S.update_state(root, "cas-1", expect_step="running", step="queued")  # a requeue, seen right
    assert changed and rec["step"] == "queued"
