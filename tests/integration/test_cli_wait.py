"""`isession start nginx --wait` on the bed as wsuser: the CLI stays attached until the session ends.

- Ctrl-C (SIGINT to the CLI's process group, as a terminal sends it) cancels the session: the CLI exits 130,
  service.json says Cancelled, no process of the session is left, the port reservation is released and nothing
  listens on the port.
- A session that ends elsewhere (`isession cancel ID` from another process) ends the attached CLI by itself: it
  prints the end status and exits 0.
- A session whose server exits ends by itself: the watcher marks it Failed, the CLI prints why and exits 1.
- A second Ctrl-C while the cancel runs its playbook (no watcher) does not interrupt it: the same clean end as one
  Ctrl-C (before the fix the CLI died of KeyboardInterrupt and its cancel's ansible-playbook went with it, leaving the
  session half cancelled).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import PLAYBOOKS, Cli  # noqa: E402
from sessions_common import WS_USER, http_get, listening, reservations, wait_until  # noqa: E402
from test_matrix import session_processes_by_host  # noqa: E402

pytestmark = [pytest.mark.bed,
              pytest.mark.skipif(not (PLAYBOOKS / "start_nginx.yml").is_file(),
                                 reason="playbooks/start_nginx.yml is not written yet")]

START_TIMEOUT = 300  # an upper bound for a loaded machine, not a measure
END_TIMEOUT = 180
WAITING = "Waiting until the session ends"


class Attached:
    """`isession start nginx --id SID --wait` as wsuser in the workspace, in its own process group (like a job a
    shell runs in the foreground of a terminal); output goes to a file the test reads while it runs."""

    def __init__(self, bed, cli: Cli, sid: str, out: Path) -> None:
        self.bed, self.cli, self.sid, self.out = bed, cli, sid, out
        self.sdir = cli.root / sid
        with open(out, "wb") as fh:
            self.proc = bed.popen("workspace", [str(bed.venv / "bin" / "python"), "-m", "isession", "start",
                                                "nginx", "--id", sid, "--wait"],
                                  user=WS_USER, env=cli.env, stdin=subprocess.DEVNULL, stdout=fh,
                                  stderr=subprocess.STDOUT)
        # nsenter and setpriv exec: the pid is the CLI's, and it leads its own process group
        assert os.getpgid(self.proc.pid) == self.proc.pid

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def service(self) -> dict:
        try:
            return json.loads((self.sdir / "service.json").read_text())
        except (OSError, ValueError):
            return {}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_running(self) -> dict:
        """Wait (polling service.json and the output) until the session is Running, its URL answers with the
        secret and the CLI says it waits; the CLI must still be attached all along."""
        ok = wait_until(lambda: not self.alive() or (self.service().get("JOB_STATUS") == "Running"
                                                     and WAITING in self.text()), START_TIMEOUT, 0.2)
        assert ok and self.alive(), f"rc={self.proc.poll()} service={self.service()}\n{self.text()}"
        svc = self.service()
        port = int(svc["PORT"])
        secret = (self.sdir / "secret").read_text().strip()
        url = f"http://127.0.0.1:{port}{svc['URL']}/{port}/"
        code, body = http_get(self.bed, "workspace", url, f"Authorization: Bearer {secret}", self.cli.tmp)
        assert code == 200 and f"hpc.interactive nginx session {self.sid}" in body, (code, body[:300])
        assert f"url       {url}" in self.text()
        assert reservations(self.sid) == [port] and listening(self.bed, "workspace", port)
        assert self.alive(), self.text()  # still attached while the session runs
        return svc

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def exit_code(self) -> int:
        try:
            return self.proc.wait(END_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the attached CLI did not exit within {END_TIMEOUT} s\n{self.text()}")

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def assert_nothing_left(bed, att: Attached, port: int) -> None:
    assert att.service()["JOB_STATUS"] == "Cancelled", att.service()
    state = att.cli.state(att.sid)
    assert state["step"] == "cancelled" and state["ended"], state
    assert wait_until(lambda: not listening(bed, "workspace", port), 10), f"port {port} still listens"
    assert reservations(att.sid) == []
    markers = (str(att.sdir),)
    assert wait_until(lambda: not session_processes_by_host(bed, att.sid, markers), 15), \
        session_processes_by_host(bed, att.sid, markers)
    assert not list((att.sdir / "logs" / "runner").glob("*.pid")), "a run of the session is still recorded"


@pytest.fixture
def attached(bed, tmp_path):
    made = []

    def make(sid: str) -> Attached:
        att = Attached(bed, Cli(bed), f"{sid}-{os.getpid()}-{int(time.time())}", tmp_path / f"{sid}.out")
        made.append(att)
        return att

    yield make
    for att in made:
        att.kill()
        if att.service().get("JOB_STATUS") not in ("Cancelled", "Completed", "Failed"):
            att.cli.run("cancel", att.sid, timeout=120)
        att.cli.stop_watcher()


def test_ctrl_c_cancels_the_session_and_exits_130(bed, attached):
    att = attached("nginx-wait-int")
    port = int(att.wait_running()["PORT"])
    att.ctrl_c()
    rc = att.exit_code()
    out = att.text()
    assert rc == 130, out
    assert "Interrupted: cancelling the session" in out
    assert out.rstrip().splitlines()[-1] == "session ended: Cancelled", out
    assert "Traceback" not in out, out
    assert_nothing_left(bed, att, port)
    # the user's watcher undid it all and said so in teardown.json: the cancel ended there, without a playbook
    assert "the user's watcher ended the session and undid everything it held" in out, out
    assert json.loads((att.sdir / "teardown.json").read_text())["complete"] is True
    assert not list((att.sdir / "logs" / "runner" / "artifacts").glob("cancel-*"))


def test_session_cancelled_elsewhere_ends_the_attached_cli(bed, attached):
    att = attached("nginx-wait-ext")
    port = int(att.wait_running()["PORT"])
    cp = att.cli.run("cancel", att.sid, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    rc = att.exit_code()
    out = att.text()
    assert rc == 0, out
    assert "Interrupted" not in out  # it ended by itself, no cancel of its own
    assert out.rstrip().splitlines()[-1] == "session ended: Cancelled", out
    assert_nothing_left(bed, att, port)


def test_second_ctrl_c_does_not_interrupt_the_cancel(bed, attached):
    att = attached("nginx-wait-int2")
    port = int(att.wait_running()["PORT"])
    runner = att.sdir / "logs" / "runner"

    def cancel_playbook_running() -> bool:
        for pidfile in runner.glob("cancel-*.pid"):
            try:
                if json.loads(pidfile.read_text()).get("playbook_pid"):
                    return True
            except (OSError, ValueError):
                pass
        return False

    # without the user's watcher the cancel runs its playbook (with it, the cancel may be over before a second
    # Ctrl-C can come): the second Ctrl-C must come while that playbook runs
    att.cli.stop_watcher()
    att.ctrl_c()
    assert wait_until(lambda: cancel_playbook_running() or not att.alive(), 60, 0.02), att.text()
    assert att.alive(), f"the CLI exited before its cancel ran\n{att.text()}"
    att.ctrl_c()  # the cancel's ansible-playbook runs now: its pid file goes only when it has ended
    rc = att.exit_code()
    out = att.text()
    assert rc == 130, out
    assert "the cancel goes on" in out, out
    assert out.rstrip().splitlines()[-1] == "session ended: Cancelled", out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert_nothing_left(bed, att, port)


def test_server_exit_ends_the_attached_cli_with_failed(bed, attached):
    """The session ends by itself: its server exits, the watcher marks the job Failed, the CLI exits 1."""
    att = attached("nginx-wait-exit")
    port = int(att.wait_running()["PORT"])
    masters = [int(line.split()[0]) for line in session_processes_by_host(bed, att.sid).get("workspace", [])
               if "nginx: master" in line]
    assert len(masters) == 1, session_processes_by_host(bed, att.sid)
    os.kill(masters[0], signal.SIGTERM)
    rc = att.exit_code()
    out = att.text()
    assert rc == 1, out
    assert "Interrupted" not in out
    last = out.rstrip().splitlines()[-1]
    # the agent's own words first, the scheduler's (here the local agent's) detail after them
    assert last.startswith("session ended: Failed: the nginx server exited with status 0 on workspace; see "
                           "logs/server.log ("), out
    svc = att.service()
    assert svc["JOB_STATUS"] == "Failed" and last == f"session ended: Failed: {svc['ERROR_MESSAGE']}", svc
    assert wait_until(lambda: not listening(bed, "workspace", port), 10), f"port {port} still listens"
    assert wait_until(lambda: reservations(att.sid) == [], 10), reservations(att.sid)
    markers = (str(att.sdir),)
    assert wait_until(lambda: not session_processes_by_host(bed, att.sid, markers), 15), \
        session_processes_by_host(bed, att.sid, markers)
