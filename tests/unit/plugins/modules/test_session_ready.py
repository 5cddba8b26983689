"""The session_ready module against real local HTTP servers (loopback only)."""
from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A loopback HTTP server answering ``status`` for paths under the expected base path, 404 otherwise."""

    def __init__(self, port: int, status: int, delay: float = 0.0):
        self.paths = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                outer.paths.append(self.path)
                code = status if self.path.startswith(f"/me/{port}/") else 404
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.timer = threading.Timer(delay, self.httpd.serve_forever) if delay else None
        if self.timer:
            self.timer.start()
        else:
            threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        if self.timer:
            self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status", [200, 302, 401, 403])
def test_ready_statuses(run_module, status):
    port = free_port()
    srv = Server(port, status)
    try:
        res = run_module("session_ready", {"port": port, "probe": "api/status", "timeout": 10})
    finally:
        srv.close()
    assert res.get("failed") is not True, res
    assert res["ready"] is True and res["status"] == status and res["changed"] is False
    assert res["probe_url"] == f"http://127.0.0.1:{port}/me/{port}/api/status"
    assert srv.paths == [f"/me/{port}/api/status"]  # redirects are not followed


def test_waits_for_a_server_that_comes_up_late(run_module):
    port = free_port()
    servers = []
    starter = threading.Timer(1.5, lambda: servers.append(Server(port, 200)))
    starter.start()
    try:
        res = run_module("session_ready", {"port": port, "timeout": 20})
    finally:
        starter.join()
        for srv in servers:
            srv.close()
    # the module needs well under 1.5 s to start, so it saw refused connections before the server came up
    assert res["ready"] is True and res["status"] == 200 and 0.2 <= res["elapsed"] < 10


def test_502_is_not_ready_and_times_out_with_words(run_module):
    port = free_port()
    srv = Server(port, 502)
    try:
        t0 = time.monotonic()
        res = run_module("session_ready", {"port": port, "timeout": 1.5})
        took = time.monotonic() - t0
    finally:
        srv.close()
    assert res["failed"] is True and res["ready"] is False and res["status"] == 502
    assert res["msg"] == "no answer from the server after 2 s (last answer HTTP 502)"
    assert 1.4 <= res["elapsed"] < 3 and took < 10


def test_terminal_step_in_state_ends_the_wait_at_once(tmp_path, run_module):
    _state.run_op("create", str(tmp_path), "s1", {})
    _state.run_op("update", str(tmp_path), "s1", {"step": "failed", "error": "sbatch: invalid partition"})
    res = run_module("session_ready", {"port": free_port(), "timeout": 60, "dir": str(tmp_path / "s1")})
    assert res["failed"] is True and res["msg"] == "sbatch: invalid partition" and res["elapsed"] < 5


def test_tombstone_ends_the_wait(tmp_path, run_module):
    _state.run_op("create", str(tmp_path), "s1", {})
    _state.run_op("cancel", str(tmp_path), "s1", {})
    res = run_module("session_ready", {"port": free_port(), "timeout": 60, "dir": str(tmp_path / "s1")})
    assert res["failed"] is True and "cancelled" in res["msg"] and res["elapsed"] < 5


def test_agent_error_and_dead_agent_end_the_wait(tmp_path, run_module):
    _state.run_op("create", str(tmp_path), "s1", {})
    (tmp_path / "s1" / "agent.error").write_text("nginx not found on workspace\n")
    res = run_module("session_ready", {"port": free_port(), "timeout": 60, "dir": str(tmp_path / "s1")})
    assert res["failed"] is True and res["msg"] == "nginx not found on workspace"
    dead = subprocess.Popen(["true"])
    dead.wait()
    res = run_module("session_ready", {"port": free_port(), "timeout": 60, "agent_pid": dead.pid})
    assert res["failed"] is True and f"agent (pid {dead.pid}) exited" in res["msg"] and res["elapsed"] < 5


def test_check_mode_probes_once_without_failing(run_module):
    res = run_module("session_ready", {"port": free_port(), "timeout": 60}, check=True)
    assert res.get("failed") is not True and res["ready"] is False and res["elapsed"] < 5


def test_bad_inputs_name_the_field(run_module):
    res = run_module("session_ready", {"port": 70000})
    assert res["failed"] is True and res["field"] == "port"
    res = run_module("session_ready", {"port": 2000, "probe": "/abs"})
    assert res["failed"] is True and res["field"] == "probe"
    res = run_module("session_ready", {"port": 2000, "url": "/x"})
    assert res["failed"] is True and "url" in res["msg"]


def test_mark_running_records_the_session_when_the_app_answers(tmp_path, run_module):
    _state.run_op("create", str(tmp_path), "s1", {"step": "starting"})
    sdir = tmp_path / "s1"
    (sdir / "service.json").write_text(json.dumps({"URL": "/me", "PORT": "2000", "JOB_STATUS": "Starting"}))
    port = free_port()
    srv = Server(port, 401)
    try:
        res = run_module("session_ready", {"port": port, "timeout": 10, "dir": str(sdir), "mark_running": True})
        check = run_module("session_ready", {"port": port, "timeout": 10, "dir": str(sdir), "mark_running": True},
                           check=True)
    finally:
        srv.close()
    assert res["ready"] is True and res["marked_running"] is True and res["changed"] is True, res
    assert json.loads((sdir / "service.json").read_text())["JOB_STATUS"] == "Running"
    assert json.loads((sdir / "state.json").read_text())["step"] == "running"
    assert check["changed"] is False and check["marked_running"] is False


def test_mark_running_refused_after_a_cancel_request(tmp_path, run_module):
    _state.run_op("create", str(tmp_path), "s1", {"step": "starting"})
    sdir = tmp_path / "s1"
    port = free_port()
    srv = Server(port, 200)
    try:
        _state.run_op("cancel", str(tmp_path), "s1", {})
        res = run_module("session_ready", {"port": port, "timeout": 10, "dir": str(sdir), "mark_running": True})
    finally:
        srv.close()
    # the app answered at the first poll, but the session is being cancelled: nothing is marked running
    assert res["failed"] is True and "being cancelled" in res["msg"] and res["field"] == "dir"
    assert json.loads((sdir / "state.json").read_text())["step"] == "starting"
    assert not (sdir / "service.json").exists()


def test_mark_running_needs_dir(run_module):
    res = run_module("session_ready", {"port": 2000, "mark_running": True})
    assert res["failed"] is True and "dir" in res["msg"]


# ----------------------------------------------------------------------------- the listener's owner
NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a listener as a second user")
def test_another_users_listener_ends_the_wait_at_once_and_gets_no_request(tmp_path, run_module):
    """A second user (nobody) bound the session's port first: its server answers 200 to anything, but the wait
    ends at once naming that user, the session is not marked running and that server never saw a request."""
    _state.run_op("create", str(tmp_path), "s1", {"step": "starting"})
    sdir = tmp_path / "s1"
    port = free_port()
    log = tmp_path / "nobody.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o666)
    other = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I",
                              "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", "/"],
                             stdout=fd, stderr=fd, cwd="/")
    os.close(fd)
    try:
        deadline = time.monotonic() + 20
        while not _listening(port):
            assert time.monotonic() < deadline, "the second user's server did not start"
            time.sleep(0.05)
        started = time.monotonic()
        res = run_module("session_ready", {"port": port, "timeout": 30, "dir": str(sdir), "mark_running": True})
        took = time.monotonic() - started
    finally:
        other.terminate()
        other.wait(10)
    assert res["failed"] is True and res["ready"] is False and res["marked_running"] is False, res
    assert f"127.0.0.1 port {port} is held by another user (uid {NOBODY} (nobody))" in res["msg"]
    assert "not marked running" in res["msg"] and took < 10
    assert "GET" not in log.read_text()  # not even the probe went there
    assert json.loads((sdir / "state.json").read_text())["step"] == "starting"


def test_own_listener_is_checked_before_ready(run_module):
    """The owner check runs before the answer counts: a listener of this user is ready as before."""
    port = free_port()
    srv = Server(port, 200)
    try:
        res = run_module("session_ready", {"port": port, "timeout": 10, "host": "localhost"})
    finally:
        srv.close()
    assert res["ready"] is True and res["status"] == 200, res


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ----------------------------------------------------------------------------- no side command
def test_starting_other_work_is_not_this_modules_job(run_module):
    """The start play ensures the watcher in its own task; the readiness wait takes no command to run."""
    res = run_module("session_ready", {"port": free_port(), "timeout": 0.5, "side_command": ["true"]})
    assert res["failed"] is True and "side_command" in res["msg"], res
