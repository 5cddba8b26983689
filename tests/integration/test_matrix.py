"""The service x target matrix: the cells that the other session tests do not cover.

nginx is covered on every target by test_sessions_{workspace,controller,compute}.py, and jupyterlab/notebook on the
workspace and Slurm compute by test_sessions_services.py. Here: code_server on workspace, controller, Slurm compute
and PBS compute; jupyterlab and notebook on controller and PBS compute.

Each cell, as wsuser through the collection's playbooks: start -> service.json Running -> in the workspace,
``http://127.0.0.1:PORT<URL>/<PORT>/<SLUG>`` answers 200 with the app's own page when the secret is given (a header
for Jupyter, a password form POST then the session cookie for code-server) and a login redirect/page or 401/403
without it -> cancel -> no job in the queue, no listener on the workspace port nor on the server's port on its host,
no process of the session on any bed host (looked up per network namespace), reservations released.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sessions_common import (  # noqa: E402
    WS_USER,
    failure_text,
    listening,
    read_json,
    reservations,
    run_playbook,
    stop_watcher,
    wait_until,
)
from sessions_common import cluster_inventory, queue  # noqa: E402
from test_sessions_services import PAGE_MARK as JUPYTER_PAGE_MARK  # noqa: E402

pytestmark = pytest.mark.bed

BED_HOSTS = ("workspace", "controller", "compute1", "compute2")
# target label -> (session_target, scheduler in the inventory, how jobs reach the workspace)
TARGETS = {
    "workspace": ("workspace", None, None),
    "controller": ("controller", "slurm", "direct"),
    "slurm": ("compute", "slurm", "direct"),
    "pbs": ("compute", "pbs", "controller"),
}
CELLS = [("code_server", "workspace"), ("code_server", "controller"), ("code_server", "slurm"),
         ("code_server", "pbs"), ("jupyterlab", "controller"), ("jupyterlab", "pbs"),
         ("notebook", "controller"), ("notebook", "pbs")]


# ---------------------------------------------------------------- processes per bed host (network namespace)
def _ns_inode(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def session_processes_by_host(bed, sid: str, markers: Tuple[str, ...] = ()) -> Dict[str, List[str]]:
    """``{host: ["pid args", ...]}`` of processes that belong to session ``sid``, per bed network namespace.

    A process belongs to the session when its environment holds ``ISESSION_ID=<sid>`` (everything the agent starts
    inherits it), or its command line or working directory mentions ``sid`` or one of ``markers`` (e.g. the session
    directories; the controller-side tunnel of reverse_tunnel carries its state dir). Processes outside the bed's
    namespaces are reported under ``"(no bed host)"``. Ansible's shared ssh connection masters (``ssh: ... [mux]``,
    ControlPersist: one reused connection per user and host, by design) are not session processes, even when their
    working directory is the runner's directory inside a session dir.
    """
    hosts = {_ns_inode(str(bed.netns_path(h))): h for h in BED_HOSTS}
    env_needle = f"ISESSION_ID={sid}".encode()
    needles = [sid, *markers]
    me = os.getpid()
    found: Dict[str, List[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        proc = f"/proc/{entry}"
        try:
            cmd = Path(proc, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            env = Path(proc, "environ").read_bytes().split(b"\0")
            try:
                cwd = os.readlink(f"{proc}/cwd")
            except OSError:
                cwd = ""
        except OSError:
            continue
        if cmd.startswith("ssh: ") and cmd.endswith("[mux]"):
            continue
        if env_needle in env or any(n in cmd or n in cwd for n in needles):
            host = hosts.get(_ns_inode(f"{proc}/ns/net"), "(no bed host)")
            found.setdefault(host, []).append(f"{entry} {cmd[:200]}")
    return found


# ---------------------------------------------------------------- HTTP from the workspace, as wsuser
def curl(bed, url: str, *args: str) -> Tuple[int, str, str]:
    """(status, redirect URL, body) of one request from the workspace as wsuser; secrets only via files."""
    argv = ["curl", "-sS", "--max-time", "20", *args, "-w", "\n%{http_code} %{redirect_url}", url]
    out = bed.run("workspace", argv, user=WS_USER, timeout=40).stdout
    body, _ignored, tail = out.rpartition("\n")
    code, _ignored, redirect = tail.partition(" ")
    return int(code or 0), redirect, body


def check_jupyter(bed, service: str, port: int, slug: str, *, secret: str, tmp: Path) -> None:
    base = f"http://127.0.0.1:{port}/me/{port}/"
    header = bed.write_user_file(WS_USER, tmp / "auth-header", f"Authorization: token {secret}\n")
    code, _ignored, body = curl(bed, base + slug, "-H", f"@{header}")
    assert code == 200 and JUPYTER_PAGE_MARK[service] in body, (code, body[:400])
    assert f'"baseUrl": "/me/{port}/"' in body, "the app does not serve under the session's base path"
    code, redirect, body = curl(bed, base + slug)
    assert code == 302 and "/login" in redirect, (code, redirect, body[:300])
    code, _ignored, body = curl(bed, base + "login")
    assert code == 200 and 'type="password"' in body, (code, body[:300])
    assert curl(bed, base + "api/status", "-H", "Authorization: token not-the-secret")[0] == 403


def check_code_server(bed, port: int, slug: str, secret: str, tmp: Path) -> None:
    base = f"http://127.0.0.1:{port}/me/{port}/"
    code, redirect, body = curl(bed, base + slug)
    assert code == 302 and "login" in redirect, (code, redirect, body[:300])
    code, _ignored, body = curl(bed, base + "login")
    assert code == 200 and 'name="password"' in body, (code, body[:300])
    bad_jar = tmp / "bad.jar"
    curl(bed, base + "login", "-c", str(bad_jar), "-X", "POST", "--data-urlencode", "password=not-the-secret")
    assert "code-server-session" not in (bad_jar.read_text() if bad_jar.exists() else "")
    # the password travels from a 0600 file (no trailing newline) into the POST body: not in argv
    pw = bed.write_user_file(WS_USER, tmp / "password", secret)
    jar = tmp / "cookies.jar"
    code, _ignored, body = curl(bed, base + "login", "-c", str(jar), "-X", "POST", "--data-urlencode", f"password@{pw}")
    assert code == 302, (code, body[:300])
    assert "code-server-session" in jar.read_text()
    code, _ignored, body = curl(bed, base + slug, "-b", str(jar))
    assert code == 200 and "vscode-workbench-web-configuration" in body, (code, body[:400])
    # the anonymous request is still refused after someone else logged in
    assert curl(bed, base + slug)[0] == 302


def server_location(state: dict) -> Tuple[str, int]:
    """(bed host, port) where the session's server listens."""
    if state["target"] == "workspace":
        return "workspace", int(state["ports"]["workspace"])
    if state["target"] == "controller":
        return "controller", int(state["ports"]["node"])
    agent = read_json(Path(state["remote_dir"]) / "agent.json")
    return agent["host"], int(agent["node_port"])


@pytest.mark.parametrize("service,target", CELLS, ids=[f"{s}-{t}" for s, t in CELLS])
def test_cell_start_serve_cancel(bed, apps, service, target):
    session_target, scheduler, via = TARGETS[target]
    inv = cluster_inventory(bed, scheduler, via) if scheduler else None
    root = bed.user_tmpdir(WS_USER) / "sessions"
    sid = f"mx-{service.replace('_', '')}-{target}-{os.getpid()}-{int(time.time()) % 100000}"
    common = dict(session_id=sid, session_root=str(root))
    extra = dict(common, session_target=session_target, session_start_timeout=120, session_queue_timeout=60)
    if scheduler:
        extra["session_resource"] = "controller"

    t0 = time.monotonic()
    res = run_playbook(bed, f"hpc.interactive.start_{service}", extra, inventory=inv)
    took_start = time.monotonic() - t0
    cancelled = False
    try:
        assert res.rc == 0, failure_text(res)
        sdir = root / sid
        svc = read_json(sdir / "service.json")
        assert svc["JOB_STATUS"] == "Running" and svc["ERROR_MESSAGE"] == "", svc
        port, slug = int(svc["PORT"]), svc["SLUG"]
        assert svc["URL"] == "/me"
        state = read_json(sdir / "state.json")
        assert state["target"] == session_target and state["step"] == "running"
        if scheduler:
            assert state["scheduler"] == (scheduler if session_target == "compute" else "local")
        host, node_port = server_location(state)
        rdir = Path(state["remote_dir"]) if state.get("remote_dir") else None
        markers = (str(sdir),) + ((str(rdir),) if rdir else ())
        if session_target == "compute":
            assert host in ("compute1", "compute2")
            assert queue(bed, f"isession-{sid}").split()[1:2] == ["RUNNING"], queue(bed, f"isession-{sid}")
        assert listening(bed, "workspace", port) and listening(bed, host, node_port)
        procs = session_processes_by_host(bed, sid, markers)
        assert procs.get(host), f"no process of the session found on {host}: {procs}"

        secret = (sdir / "secret").read_text().strip()
        assert secret not in res.stdout
        tmp = bed.user_tmpdir(WS_USER)
        if service == "code_server":
            check_code_server(bed, port, slug, secret, tmp)
        else:
            check_jupyter(bed, service, port, slug, secret=secret, tmp=tmp)
        print(f"{service} on {target}: start {took_start:.2f} s", end="")

        t0 = time.monotonic()
        res = run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
        cancelled = True
        assert res.rc == 0, failure_text(res)
        print(f", cancel {time.monotonic() - t0:.2f} s")
        assert read_json(sdir / "service.json")["JOB_STATUS"] == "Cancelled"
        assert read_json(sdir / "state.json")["step"] == "cancelled"
        if session_target == "compute":
            assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 10), queue(bed, f"isession-{sid}")
        assert wait_until(lambda: not listening(bed, "workspace", port), 10), f"workspace port {port} listens"
        assert wait_until(lambda: not listening(bed, host, node_port), 10), f"{host} port {node_port} listens"
        assert wait_until(lambda: not session_processes_by_host(bed, sid, markers), 15), \
            session_processes_by_host(bed, sid, markers)
        assert wait_until(lambda: reservations(sid) == [], 5), reservations(sid)
    finally:
        if not cancelled:
            run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
        stop_watcher(root)
