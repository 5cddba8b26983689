"""Helpers (no tests) for the gateway tests: a gateway, test backends and clients inside the bed's workspace host.

Everything runs in the ``workspace`` namespace as the bed's users (``bed.popen("workspace", ..., user=...)``): the
gateway, its backends, the HTTP/WebSocket client and the browser. Ports below 10000 stay clear of the range the
collection reserves session ports from (10000-32767) and of X11's 6000-6099.
"""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Optional

from cli_support import Cli

TOOLS = Path(__file__).resolve().parent / "gateway_tools"
ARTIFACTS = Path(__file__).resolve().parents[1] / "output" / "gateway"  # git-ignored (/tests/output/)


def chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, pw.pw_uid, pw.pw_gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid)


class GatewayRun:
    """One ``isession gateway`` as ``cli.user`` in the workspace host, with that user's session root."""

    def __init__(self, cli: Cli, port: int, *args: str, secret: str = "gateway-test-secret-0123456789",  # noqa: S107
                 as_root: bool = False) -> None:
        self.cli, self.bed, self.port = cli, cli.bed, port
        self.run_as = None if as_root else cli.user
        self.base = f"http://127.0.0.1:{port}"
        self.secret = secret
        self.secret_file = cli.bed.write_user_file(cli.user, cli.tmp / f"gateway-{port}.secret", secret + "\n")
        self.log = cli.tmp / f"gateway-{port}.log"
        self.args = ["--listen", f"127.0.0.1:{port}", "--secret-file", str(self.secret_file), *args]
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> GatewayRun:
        fh = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        os.chown(self.log, *_ids(self.cli.user))
        self.proc = self.bed.popen("workspace", [str(self.bed.venv / "bin" / "python"), "-m", "isession", "gateway",
                                                 *self.args], user=self.run_as, env=self.cli.env,
                                   stdout=fh, stderr=subprocess.STDOUT)
        fh.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log_text()}")
            if "isession gateway on" in self.log_text() and self.answers():
                return self
            time.sleep(0.2)
        raise AssertionError(f"gateway did not come up:\n{self.log_text()}")

    def answers(self) -> bool:
        cp = self.bed.run("workspace", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", self.base + "/login"],
                          user=self.cli.user, timeout=10)
        return cp.stdout.strip() not in ("", "000")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    # ---------------------------------------------------------------- clients (inside the namespace)
    def tool(self, name: str, *args: str, user: Optional[str] = None, timeout: float = 60) -> dict:
        cp = self.bed.run("workspace", [str(self.bed.venv / "bin" / "python"), str(self.cli.tmp / "tools" / name),
                                        *args], user=user or self.cli.user, env=self.cli.env, timeout=timeout)
        assert cp.returncode == 0, f"{name} {args} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
        return json.loads(cp.stdout.strip().splitlines()[-1])

    def login(self, secret: Optional[str] = None, user: Optional[str] = None) -> str:
        extra = ["--user", user] if user else []
        res = self.tool("client.py", "login", self.base, secret or self.secret, *extra)
        assert res["status"] == 303 and res["cookie"], res
        return res["cookie"]

    def http(self, method: str, path: str, cookie: Optional[str] = None, *more: str) -> dict:
        args = ["http", method, self.base + path] + ([f"--cookie={cookie}"] if cookie else []) + list(more)
        return self.tool("client.py", *args)

    def ws(self, path: str, cookie: Optional[str], origin: Optional[str] = None) -> dict:
        args = ["ws", "ws://127.0.0.1:%d%s" % (self.port, path)] + ([f"--cookie={cookie}"] if cookie else [])
        args += ["--origin", origin or self.base]
        return self.tool("client.py", *args)


def _ids(user: str):
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def install_tools(cli: Cli) -> Path:
    """Copy the helper scripts where ``cli.user`` can run them."""
    dest = cli.tmp / "tools"
    shutil.copytree(TOOLS, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    chown_tree(dest, cli.user)
    return dest


class Backend:
    """``gateway_tools/backend.py`` on ``port`` as ``cli.user``; ``accepts()`` counts the connections it took."""

    def __init__(self, cli: Cli, port: int, prefix: str = "/me", tls: Optional[List[str]] = None) -> None:
        self.cli, self.port = cli, port
        self.accept_log = cli.tmp / f"accepts-{port}.log"
        cli.bed.write_user_file(cli.user, self.accept_log, "", mode=0o644)
        self.proc = cli.bed.popen("workspace", [str(cli.bed.venv / "bin" / "python"),
                                                str(cli.tmp / "tools" / "backend.py"), str(port),
                                                str(self.accept_log), "--prefix", prefix, *(tls or [])],
                                  user=cli.user, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        line = self.proc.stdout.readline().decode()
        assert "listening" in line, line + self.proc.stdout.read().decode()

    def accepts(self) -> int:
        return len(self.accept_log.read_text().splitlines())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


def fake_session(cli: Cli, sid: str, port: int, status: str = "Running", message: str = "", *,
                 root: Optional[Path] = None, url: str = "/me", raw_status: Optional[str] = None,
                 service: str = "nginx") -> Path:
    """A session record + service.json written as ``cli.user`` through the collection's own module_utils."""
    root = root or cli.root
    args = [str(cli.bed.venv / "bin" / "python"), str(cli.tmp / "tools" / "session.py"), str(root), sid, str(port),
            status, message, "--url", url, "--service", service]
    if raw_status:
        args += ["--raw-status", raw_status]
    env = dict(cli.env, PYTHONPATH=f"{cli.env['PYTHONPATH']}:{cli.bed.collections_path}")
    cp = cli.bed.run("workspace", args, user=cli.user, env=env, timeout=30)
    assert cp.returncode == 0, cp.stderr
    return root / sid


def wait_for(pred, timeout: float, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def stop_all(items: List) -> None:
    for item in items:
        with contextlib.suppress(Exception):  # best effort in teardown
            item.stop()
