"""`isession` on the bed as wsuser, through real ansible-runner: start nginx on the workspace ->
Running -> status/list -> cancel -> Cancelled; the secret is nowhere in extravars/artifacts/events."""
from __future__ import annotations

import json
import time

import pytest

from cli_support import PLAYBOOKS, Cli, files_containing

pytestmark = [pytest.mark.bed,
              pytest.mark.skipif(not (PLAYBOOKS / "start_nginx.yml").is_file(),
                                 reason="playbooks/start_nginx.yml is not written yet")]


def http_status(bed, url: str) -> int:
    cp = bed.run("workspace", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url])
    return int(cp.stdout or 0)


def test_start_nginx_on_the_workspace_then_cancel(bed):
    cli = Cli(bed)
    try:
        started = time.monotonic()
        cp = cli.run("start", "nginx", "--id", "nginx-cli-1", timeout=300)
        took = time.monotonic() - started
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert "Starting nginx session nginx-cli-1 on workspace" in cp.stdout
        assert "status    Running" in cp.stdout
        url_line = next(line for line in cp.stdout.splitlines() if line.startswith("url "))
        url = url_line.split()[1]
        svc = cli.service("nginx-cli-1")
        assert svc["JOB_STATUS"] == "Running" and url.startswith(f"http://127.0.0.1:{svc['PORT']}{svc['URL']}/")
        # not a terminal: no progress lines, the result and how to end the session
        assert not [line for line in cp.stdout.splitlines() if line.startswith(("  ok", "  changed"))]
        assert "cancel    isession cancel nginx-cli-1" in cp.stdout
        print(f"isession start nginx (workspace): {took:.1f}s")

        status = cli.json("status", "nginx-cli-1")
        assert status["status"] == "Running" and status["url"] == url
        listing = cli.run("list", check_rc=0).stdout
        assert "nginx-cli-1" in listing and "Running" in listing

        # the secret: 0600, and in no runner file (extravars, events, stdout)
        secret_file = cli.root / "nginx-cli-1" / "secret"
        assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
        secret = secret_file.read_text().strip()
        assert len(secret) >= 16
        runner = cli.root / "nginx-cli-1" / "logs" / "runner"
        assert (runner / "artifacts" / "start" / "job_events").is_dir()
        # the steps only a play without isession needs (tag session_without_cli) are not in the play at all: the
        # CLI ensured the watcher and printed the result itself
        names = {json.loads(p.read_text()).get("event_data", {}).get("task", "")
                 for p in (runner / "artifacts" / "start" / "job_events").glob("*.json")}
        assert "Wait until the app answers through the session's port, then record it as running" in names
        assert not [n for n in names if n.startswith(("Ensure the user's watcher", "Say how to reach"))], names
        assert files_containing(runner, secret) == []
        ps = bed.run("workspace", ["ps", "-eo", "args"]).stdout
        assert secret not in ps

        cc = cli.run("cancel", "nginx-cli-1", timeout=120)
        assert cc.returncode == 0, cc.stdout + cc.stderr
        assert cli.service("nginx-cli-1")["JOB_STATUS"] == "Cancelled"
        assert cli.json("status", "nginx-cli-1")["status"] == "Cancelled"
        assert files_containing(runner, secret) == []
        for _attempt in range(20):
            if http_status(bed, url) == 0:
                break
            time.sleep(0.25)
        assert http_status(bed, url) == 0, "the server still answers after cancel"
        # cancel again: nothing left to do, still fine
        assert cli.run("cancel", "nginx-cli-1", timeout=120).returncode == 0
        logs = cli.run("logs", "nginx-cli-1", check_rc=0).stdout
        assert "artifacts/start/stdout" in logs
    finally:
        cli.stop_watcher()


def test_without_inventory_only_the_workspace_exists(bed):
    cli = Cli(bed, inventory=False)
    cp = cli.run("start", "nginx", "--target", "compute", "--resource", "controller")
    assert cp.returncode == 2 and "needs an inventory" in cp.stderr


def test_describe_nginx(bed):
    cli = Cli(bed)
    out = cli.run("describe", "nginx", check_rc=0).stdout
    assert "Service inputs:" in out and "Session inputs" in out
    assert "session_target" in out and "choices: workspace, controller, compute" in out
    info = cli.json("describe", "nginx")
    assert any(row["name"].startswith("nginx_") for row in info["service_inputs"])


def test_doctor_reaches_the_controller(bed):
    cli = Cli(bed)
    cp = cli.run("doctor", "--resource", "controller", timeout=120)
    assert "controller" in cp.stdout and "reachable as cluser@10.199.77.20" in cp.stdout, cp.stdout + cp.stderr
    assert "missing:" not in cp.stdout
