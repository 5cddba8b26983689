"""The CLI end to end through real ansible-runner, with stand-in playbooks (no test bed needed).

The fake start creates a real record (``_state``, which also makes the 0600 secret) and a real
service.json (module ``service_json``); the fake cancel sets the tombstone and Cancelled.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ptyprocess import ptyprocess

from isession import play
from isession.collection import Collection
from isession.progress import Progress
from isession.watchfiles import running_pid

REPO = Path(__file__).resolve().parents[3]


def run_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isession", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout, check=False)


def all_files(top: Path):
    return [p for p in top.rglob("*") if p.is_file()]


def test_start_status_list_cancel(cli_env, tmp_path):
    root = Path(cli_env["ISESSION_ROOT"])
    cp = run_cli(cli_env, "start", "fake", "--id", "fake-1")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    out = cp.stdout
    assert "Starting fake session fake-1 on workspace" in out
    assert "Write service.json" not in out  # not a terminal: no progress, only the result
    assert "url       http://127.0.0.1:12345/me/12345/lab" in out
    assert f"file      {root}/fake-1/service.json" in out
    assert "cancel    isession cancel fake-1" in out
    # the private data dir of the run lives in the session dir and is private
    art = root / "fake-1" / "logs" / "runner" / "artifacts" / "start"
    assert (art / "job_events").is_dir() and (art / "stdout").is_file()
    assert oct((root / "fake-1").stat().st_mode & 0o777) == "0o700"
    assert not list((root / "fake-1" / "logs" / "runner").glob("*.pid"))  # removed after the run
    # the secret (made inside the module run) is nowhere in the runner's files
    secret = (root / "fake-1" / "secret").read_text().strip()
    assert len(secret) >= 32
    for path in all_files(root / "fake-1" / "logs"):
        assert secret not in path.read_text(errors="replace"), path
    extravars = json.loads((root / "fake-1" / "logs" / "runner" / "env" / "extravars").read_text())
    assert extravars == {"session_id": "fake-1", "session_root": str(root), "session_target": "workspace",
                         "session_watcher": False}

    st = run_cli(cli_env, "status", "fake-1", "--json")
    assert json.loads(st.stdout)["status"] == "Running"
    ls = run_cli(cli_env, "list")
    assert "fake-1" in ls.stdout and "Running" in ls.stdout

    cc = run_cli(cli_env, "cancel", "fake-1")
    assert cc.returncode == 0, cc.stdout + cc.stderr
    assert "status    Cancelled" in cc.stdout
    assert json.loads(run_cli(cli_env, "status", "fake-1", "--json").stdout)["status"] == "Cancelled"
    # cancel twice is fine
    assert run_cli(cli_env, "cancel", "fake-1").returncode == 0
    logs = run_cli(cli_env, "logs", "fake-1", "-n", "5")
    assert "artifacts/start/stdout" in logs.stdout and "artifacts/cancel-" in logs.stdout
    _stop_watcher(root)


def test_start_json_output(cli_env):
    cp = run_cli(cli_env, "start", "fake", "--id", "fake-j", "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)  # only the JSON document on stdout; messages went to stderr
    assert doc["id"] == "fake-j" and doc["status"] == "Running" and doc["url"].endswith("/me/12345/lab")
    assert doc["cancel"] == "isession cancel fake-j"
    assert "Starting fake session fake-j" in cp.stderr and "Write service.json" not in cp.stderr
    _stop_watcher(Path(cli_env["ISESSION_ROOT"]))


def test_verbose_prints_one_line_per_finished_task(cli_env):
    cp = run_cli(cli_env, "start", "fake", "--id", "fake-v", "-v")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "changed Write service.json" in cp.stdout
    assert "Wait a while" in cp.stdout  # -v: skipped tasks too
    _stop_watcher(Path(cli_env["ISESSION_ROOT"]))


def test_failed_start_exits_1_with_the_message(cli_env):
    cp = run_cli(cli_env, "start", "fake", "--id", "fake-f", "-e", "fake_fail=true")
    assert cp.returncode == 1
    assert "status    Failed" in cp.stdout and "message   fake failure for the test" in cp.stdout
    assert "cancel    " not in cp.stdout  # nothing left to cancel
    cp = run_cli(cli_env, "start", "fake", "--id", "fake-f2", "-e", "fake_fail=true", "-v")
    assert re.search(r"failed  Fail when asked \([0-9.]+s\): fake failure for the test", cp.stdout), cp.stdout


def test_live_view_on_a_terminal_shows_the_step_and_the_time(cli_env):
    """On a terminal the start draws a live view (the step under way, its time) and then prints the result."""
    import pty  # noqa: PLC0415

    pid, fd = pty.fork()
    if pid == 0:  # the child: isession on the pty
        os.environ.update(cli_env, TERM="xterm", COLUMNS="120", LINES="40")
        argv = [sys.executable, "-m", "isession", "start", "fake", "--id", "fake-tty", "-e", "fake_sleep=2"]
        os.execv(argv[0], argv)  # noqa: S606 - a fixed argv, no shell
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _ignored, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert "Wait a while" in out  # the step the view showed while it ran
    assert re.search(r"fake session fake-tty · \d+s elapsed", out), out
    assert "\x1b[" in out  # drawn with terminal control sequences ...
    assert "status    Running" in out  # ... then the result, as off a terminal
    _stop_watcher(Path(cli_env["ISESSION_ROOT"]))


@pytest.mark.parametrize(("args", "match"), [
    (["start", "nope"], "no service 'nope'"),
    (["start", "fake", "-e", "vnc_password=x"], "looks like a secret"),
    (["start", "fake", "--target", "compute", "--resource", "ctl"], "needs an inventory"),
    (["status", "missing-id"], "no session"),
    (["cancel", "../etc"], "not a session id"),
])
def test_usage_errors_exit_2(cli_env, args, match):
    cp = run_cli(cli_env, *args)
    assert cp.returncode == 2, cp.stdout + cp.stderr
    assert match in cp.stderr


def test_cancel_stops_a_start_in_progress(cli_env):
    root = Path(cli_env["ISESSION_ROOT"])
    start = subprocess.Popen([sys.executable, "-m", "isession", "start", "fake", "--id", "fake-s", "-e",
                              "fake_sleep=60"], env={**os.environ, **cli_env}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        pidfile = root / "fake-s" / "logs" / "runner" / "start.pid"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (root / "fake-s" / "state.json").exists() and pidfile.exists() \
                    and json.loads(pidfile.read_text()).get("playbook_pid"):
                break
            time.sleep(0.2)
        playbook_pid = json.loads(pidfile.read_text())["playbook_pid"]
        started = time.monotonic()
        cc = run_cli(cli_env, "cancel", "fake-s")
        assert cc.returncode == 0, cc.stdout + cc.stderr
        assert "stopped the start in progress" in cc.stdout
        rc = start.wait(timeout=30)
        assert time.monotonic() - started < 30
        assert rc != 0
        assert not Path(f"/proc/{playbook_pid}").exists() or _zombie(playbook_pid)
        doc = json.loads((root / "fake-s" / "service.json").read_text())
        assert doc["JOB_STATUS"] == "Cancelled"
    finally:
        start.kill()
        start.wait()


def test_watch_daemon_is_one_per_user(cli_env):
    root = Path(cli_env["ISESSION_ROOT"])
    first = run_cli(cli_env, "watch", "--daemon")
    assert first.returncode == 0 and "watcher started (pid" in first.stdout
    second = run_cli(cli_env, "watch", "--daemon")
    assert second.returncode == 0 and "already runs" in second.stdout
    pid = int((root / ".watcher.pid").read_text())
    assert f"pid {pid}" in second.stdout
    for _attempt in range(50):  # its log's lines carry milliseconds (the order and gaps of a burst show)
        lines = (root / ".watcher.log").read_text().splitlines() if (root / ".watcher.log").exists() else []
        if lines:
            break
        time.sleep(0.1)
    assert re.match(rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}} watcher pid {pid} on ", lines[0]), lines
    _stop_watcher(root)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _stop_watcher(root: Path) -> None:
    pid = running_pid(root)
    if pid and pid > 0:
        os.kill(pid, 15)
        for _attempt in range(50):
            if running_pid(root) is None:
                break
            time.sleep(0.1)


CANCEL_REPORTING_IMPORTS = """
import sys
from isession import cli
rc = cli.main(["cancel", sys.argv[1]])
heavy = sorted(m for m in ("ansible.constants", "ansible.plugins.loader", "isession.watcher", "rich")
               if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
print("FINDER=" + ",".join(type(f).__name__ for f in sys.meta_path if "Collection" in type(f).__name__))
sys.exit(rc)
"""


CANCEL_TOMBSTONE_ORDER = """
import json, sys
from pathlib import Path

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "isession.commands" and "SEEN" not in globals():
            globals()["SEEN"] = json.loads(Path(sys.argv[2], "state.json").read_text()).get("cancel_requested")
        return None

sys.meta_path.insert(0, Spy())
from isession import cli
rc = cli.main(["cancel", sys.argv[1]])
print("TOMBSTONE_BEFORE_COMMANDS=" + str(bool(SEEN)))
heavy = sorted(m for m in ("ansible.utils.collection_loader", "secrets") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(rc)
"""


def test_a_cancel_sets_its_tombstone_before_it_imports_the_commands_code(cli_env):
    """The watcher can only begin a cancel once its tombstone is there: the command line sets it (and wakes the
    watcher) right after the collection is importable, before the commands' own imports; and neither ansible-core's
    collection loader nor ``secrets`` (hashlib, OpenSSL) is imported by a cancel at all."""
    root = Path(cli_env["ISESSION_ROOT"])
    assert run_cli(cli_env, "start", "fake", "--id", "fake-t").returncode == 0
    env = {k: v for k, v in {**os.environ, **cli_env}.items() if k != "ISESSION_COLLECTIONS"}
    try:
        cp = subprocess.run([sys.executable, "-c", CANCEL_TOMBSTONE_ORDER, "fake-t", str(root / "fake-t")],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert "status    Cancelled" in cp.stdout
        assert "TOMBSTONE_BEFORE_COMMANDS=True\n" in cp.stdout, cp.stdout
        assert "HEAVY=\n" in cp.stdout, cp.stdout
    finally:
        _stop_watcher(root)


def test_cancel_runs_the_copy_its_start_ran_without_loading_ansibles_configuration(cli_env, tmp_path):
    """Twenty cancels at once pay each command's start-up on the same cores: a cancel finds the collection its start
    recorded (cli.json) and imports its module_utils as a plain namespace package: neither Ansible's configuration
    and plugin loaders nor its collection finder (and the YAML parser that reads meta/runtime.yml)."""
    root = Path(cli_env["ISESSION_ROOT"])
    assert run_cli(cli_env, "start", "fake", "--id", "fake-l").returncode == 0
    recorded = json.loads((root / "fake-l" / "logs" / "runner" / "cli.json").read_text())
    assert recorded["collection"] == cli_env["ISESSION_COLLECTIONS"]
    env = {k: v for k, v in {**os.environ, **cli_env}.items() if k != "ISESSION_COLLECTIONS"}
    try:
        cp = subprocess.run([sys.executable, "-c", CANCEL_REPORTING_IMPORTS, "fake-l"], capture_output=True,
                            text=True, env=env, timeout=120, check=False)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert "status    Cancelled" in cp.stdout  # the recorded copy's cancel playbook ran
        assert "HEAVY=\n" in cp.stdout, cp.stdout
        assert "FINDER=\n" in cp.stdout, cp.stdout  # the module_utils came through Python's own import system
        # a session whose record names no usable copy: found the usual way, with Ansible's configuration
        (root / "fake-l" / "logs" / "runner" / "cli.json").write_text(json.dumps(dict(recorded, collection="")))
        cp = subprocess.run([sys.executable, "-c", CANCEL_REPORTING_IMPORTS, "fake-l"], capture_output=True,
                            text=True, env={**env, "ANSIBLE_COLLECTIONS_PATH": cli_env["ISESSION_COLLECTIONS"],
                                            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False"},
                            timeout=120, check=False)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        # the configuration is read to find the copy, and the plugin loaders are still not needed
        assert "HEAVY=ansible.constants\n" in cp.stdout, cp.stdout
    finally:
        _stop_watcher(root)


START_REPORTING_IMPORTS = """
import sys
from isession import cli
rc = cli.main(["start", "fake", "--id", sys.argv[1]])
heavy = sorted(m for m in ("ansible.constants", "ansible.plugins.loader", "rich") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(rc)
"""


def test_a_start_loads_neither_ansibles_plugin_loaders_nor_its_configuration_with_a_pinned_copy(cli_env):
    """The start's play is another process: the command itself needs ansible-core's collection finder only. With
    ``$ISESSION_COLLECTIONS`` it does not read Ansible's configuration either; without, it reads it to find the copy
    ansible-playbook will use."""
    root = Path(cli_env["ISESSION_ROOT"])
    env = {**os.environ, **cli_env}
    try:
        cp = subprocess.run([sys.executable, "-c", START_REPORTING_IMPORTS, "fake-s"], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert "status    Running" in cp.stdout and "HEAVY=\n" in cp.stdout, cp.stdout
        unpinned = {k: v for k, v in env.items() if k != "ISESSION_COLLECTIONS"}
        cp = subprocess.run([sys.executable, "-c", START_REPORTING_IMPORTS, "fake-u"], capture_output=True, text=True,
                            env={**unpinned, "ANSIBLE_COLLECTIONS_PATH": cli_env["ISESSION_COLLECTIONS"],
                                 "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False"}, timeout=120, check=False)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert "status    Running" in cp.stdout and "HEAVY=ansible.constants\n" in cp.stdout, cp.stdout
    finally:
        for sid in ("fake-s", "fake-u"):
            if (root / sid).is_dir():
                run_cli(cli_env, "cancel", sid)
        _stop_watcher(root)


def test_no_delay_after_closing_a_pty_whose_process_is_gone(monkeypatch):
    """ansible-runner closes ansible-playbook's pty once the process was reaped: no 0.1 s wait then, as before else."""
    monkeypatch.setattr(ptyprocess.PtyProcess, "close", ptyprocess.PtyProcess.close)  # undone after the test
    play._no_delay_after_close()
    play._no_delay_after_close()  # once only: not wrapped twice
    assert ptyprocess.PtyProcess.close._isession_no_delay
    slept, real_sleep = [], time.sleep

    def sleep(seconds):
        slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(ptyprocess.time, "sleep", sleep)
    gone = ptyprocess.PtyProcess.spawn(["true"])
    while gone.isalive():
        os.sched_yield()
    gone.close()
    alive = ptyprocess.PtyProcess.spawn(["sleep", "30"])
    alive.close(force=True)
    assert slept[0] == 0 and slept[1] == 0.1 and not alive.isalive()


HOLD_PLAYBOOK = """- name: Hold the play
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Wait a long time
      ansible.builtin.command: sleep 3217
"""


def _holders() -> list:
    """The task's ``sleep 3217`` processes, wherever they are (a worker runs in a session of its own)."""
    return [n for n in os.listdir("/proc") if n.isdigit() and play._proc.cmdline(n) == ["sleep", "3217"]]


@pytest.mark.parametrize("when", ["before the play is spawned", "while a task runs"])
def test_a_cancel_stops_the_play_at_once_not_at_the_runners_next_wake_up(
        fake_collection, tmp_path, monkeypatch, when):
    """A start waiting in the queue must cost nothing, so ansible-runner's loop wakes rarely (``RUNNER_WAKE``); the
    cancel event (Ctrl-C, SIGTERM) stops the play through its own thread, whatever that wake-up interval is."""
    monkeypatch.setattr(play, "RUNNER_WAKE", 3600.0)  # the runner's loop alone would look at the cancel in an hour
    col = Collection(root=fake_collection, version="0.0.1")
    (col.path / "playbooks" / "hold.yml").write_text(HOLD_PLAYBOOK)
    cancel, progress, out = threading.Event(), Progress(), {}
    if when == "before the play is spawned":
        cancel.set()
    else:
        def cancel_once_the_task_runs() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if progress.playbook_pid and _holders():
                    out["task_ran"] = True
                    cancel.set()
                    return
                time.sleep(0.05)

        threading.Thread(target=cancel_once_the_task_runs, daemon=True).start()
    run = threading.Thread(target=lambda: out.update(result=play.run_playbook(
        col, tmp_path / "s1", "hold", {}, inventory=None, ident="hold", progress=progress, cancel=cancel)),
        daemon=True)
    run.start()
    run.join(120)
    assert not run.is_alive(), "the play went on after the cancel"
    assert out["result"].status == "canceled", out["result"]
    if when == "while a task runs":
        # the runner's own cancel (SIGKILL to the play's group) would leave the task's worker and its command
        assert out.get("task_ran"), "the task never ran"
        deadline = time.monotonic() + 10
        while _holders() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _holders(), "the running task's command outlived the cancel"
    assert not play.playbook_children()


def _waiting_standbys(root: Path) -> list:
    return [d for d in (root / ".standby").glob("*") if (d / "sock").exists() and not (d / "taken").exists()]


def _wait_for(what, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def test_a_start_takes_the_standby_the_previous_start_left_and_each_later_start_leaves_one(cli_env):
    """ISESSION_STANDBY: the first start runs its own play, then leaves a waiting one; the second start's play is
    that one (its artifacts are a link to the standby's), with the second start's inputs, and it works as always:
    Running, the inputs where a cold start keeps them, the logs, the cancel."""
    root = Path(cli_env["ISESSION_ROOT"])
    env = dict(cli_env, ISESSION_STANDBY="120")
    first = run_cli(env, "start", "fake", "--id", "sb-1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert not (root / "sb-1" / "logs" / "runner" / "artifacts").is_symlink()  # nothing waited yet
    waiting = _wait_for(lambda: _waiting_standbys(root))
    assert len(waiting) == 1 and oct(waiting[0].stat().st_mode & 0o777) == "0o700"
    second = run_cli(env, "start", "fake", "--id", "sb-2", "-e", "fake_sleep=0")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "url       http://127.0.0.1:12345/me/12345/lab" in second.stdout
    artifacts = root / "sb-2" / "logs" / "runner" / "artifacts"
    assert artifacts.is_symlink() and artifacts.resolve() == (waiting[0] / "runner" / "artifacts").resolve()
    assert (waiting[0] / "taken").read_text() == "sb-2\n"
    assert (artifacts / "start" / "status").read_text() == "successful"
    extravars = json.loads((root / "sb-2" / "logs" / "runner" / "env" / "extravars").read_text())
    assert extravars["session_id"] == "sb-2" and extravars["fake_sleep"] == "0"
    assert json.loads(run_cli(env, "status", "sb-2", "--json").stdout)["status"] == "Running"
    assert "artifacts/start/stdout" in run_cli(env, "logs", "sb-2", "-n", "5").stdout
    assert run_cli(env, "cancel", "sb-2").returncode == 0
    # the second start left the next one; a start whose environment differs does not take it (it runs its own play)
    nxt = _wait_for(lambda: _waiting_standbys(root))
    third = run_cli(dict(env, ANSIBLE_FORCE_COLOR="0"), "start", "fake", "--id", "sb-3")
    assert third.returncode == 0, third.stdout + third.stderr
    assert not (root / "sb-3" / "logs" / "runner" / "artifacts").is_symlink()
    # ... and the standby it leaves replaces the one that was not wanted: at most one waits, an untaken one is removed
    _wait_for(lambda: not nxt[0].exists())
    last = _wait_for(lambda: _waiting_standbys(root))
    assert len(last) == 1
    # SIGTERM ends a standby at once: its waiting play, its directory
    helper = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith(f"_standby {last[0]}")]
    assert len(helper) == 1
    os.kill(helper[0], 15)
    _wait_for(lambda: not last[0].exists(), 15)
    _wait_for(lambda: not [p for p in os.listdir("/proc") if p.isdigit() and str(last[0]) in _cmdline(p)], 15)
    _stop_watcher(root)


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
