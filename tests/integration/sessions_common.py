"""Helpers shared by the session tests (no tests here): start/cancel through the collection's playbooks on the bed.

The playbooks run as ``wsuser`` in the workspace, by their FQCN (``hpc.interactive.start_nginx``) imported from a
one-line playbook in the user's own temporary directory. Everything is checked from outside as root: files on the
shared filesystem, listeners per network namespace, and processes in ``/proc`` (one pid namespace for all hosts).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional

from ansible_collections.hpc.interactive.plugins.module_utils._watcher_pid import watcher_pid

WS_USER = "wsuser"
PORTS_DIR = Path("/tmp/isession-ports")
# a service role's install entry point, run as root on the workspace (format with service=...)
INSTALL_PLAY = """- name: Install {service}
  hosts: localhost
  gather_facts: false
  vars:
    ansible_python_interpreter: /usr/bin/python3
  tasks:
    - name: Run the install entry point
      ansible.builtin.include_role:
        name: hpc.interactive.{service}
        tasks_from: install
"""


# Every service whose software the tests run, and the command its install entry point provides.
APPS: Dict[str, str] = {
    "nginx": "/usr/sbin/nginx",
    "jupyterlab": "/opt/hpc-interactive/apps/jupyterlab/bin/jupyter-lab",
    "notebook": "/opt/hpc-interactive/apps/notebook/bin/jupyter-notebook",
    "code_server": "/opt/hpc-interactive/apps/code-server/bin/code-server",
}


def install_service(bed, service: str, check: bool = False, timeout: float = 1800):
    """Run ``service``'s install entry point as root on the machine itself (``host=None``).

    The bed's hosts have no route to any package registry but share this filesystem, so what is
    installed here is installed on every bed host, as a site's shared /opt would be.
    """
    return bed.playbook_json(INSTALL_PLAY.format(service=service), host=None, user="root", check=check,
                             timeout=timeout)


def cluster_inventory(bed, scheduler: str = "slurm", via: str = "direct", user: str = WS_USER,
                      extra: str = "") -> Path:
    """The bed inventory with the controller described as a resource (``scheduler``; jobs reach the workspace
    ``via`` direct or the controller), written for ``user``; ``extra``: more host vars (INI, no spaces in values)."""
    text = bed.inventory_path.read_text()
    line = f"controller ansible_host={bed.ip('controller')} ansible_user=cluser"
    assert line in text, f"bed inventory changed shape: {text}"
    text = text.replace(line, f"{line} isession_scheduler={scheduler} isession_workspace_address={bed.ip('workspace')} "
                              f"isession_workspace_user={WS_USER} isession_tunnel_via={via}"
                              + (f" {extra}" if extra else ""))
    return bed.write_user_file(user, bed.user_tmpdir(user) / "inventory.ini", text, mode=0o644)


def queue(bed, name: str) -> str:
    """The Slurm queue's lines (``id state reason``) of the jobs named ``name``."""
    return bed.slurm(["squeue", "-h", "-n", name, "-o", "%i %T %R"]).stdout.strip()


def run_playbook(bed, fqcn: str, extra_vars: dict, inventory=None, timeout: float = 600):
    text = f"---\n- name: Run {fqcn}\n  ansible.builtin.import_playbook: {fqcn}\n"
    return bed.playbook_json(text, user=WS_USER, extra_vars=extra_vars, inventory=inventory, timeout=timeout)


def task_results(res, contains: str) -> List[dict]:
    """Per-host results of every task whose name contains ``contains``."""
    return [r for t in res.tasks() if contains in t["task"]["name"] for r in t["hosts"].values()]


def failure_text(res) -> str:
    failed = [r.get("msg", "") for t in res.tasks() for r in t["hosts"].values() if r.get("failed")]
    return f"rc={res.rc} failed={failed!r} stderr={res.stderr[-2000:]!r}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def listening(bed, host: str, port: int) -> bool:
    out = bed.run(host, ["ss", "-Hltn", f"sport = :{port}"], check=True).stdout
    return bool(out.strip())


def session_processes(marker: str) -> Dict[int, str]:
    """Processes whose cwd or command line mentions ``marker`` (the session id or directory)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                cwd = ""
        except OSError:
            continue
        if marker in cmd or marker in cwd:
            found[int(entry)] = f"cwd={cwd} cmd={cmd.strip()}"
    return found


def stop_watcher(root: Path) -> None:
    """SIGTERM the watcher of a session root while it still holds its lock. The pid in a file an ended watcher left
    behind may by now name any process (pids wrap at 32768 here, within minutes): that one is never signalled."""
    pid = watcher_pid(str(root))  # the lock decides, not the file's text
    if pid and pid > 0:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def wait_until(pred, timeout: float = 10.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def reservations(owner: str, ports_dir: Path = PORTS_DIR) -> List[int]:
    out = []
    for f in ports_dir.glob("port-*") if ports_dir.is_dir() else []:
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("owner") == owner:
            out.append(rec["port"])
    return out


def http_get(bed, host: str, url: str, secret_header: Optional[str], tmpdir: Path, *, user: str = WS_USER):
    """(status, body) of a GET from ``host`` as ``user``; the header travels in a 0600 file, not argv."""
    argv = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"]
    if secret_header:
        hfile = bed.write_user_file(user, tmpdir / f"h-{time.monotonic_ns()}", secret_header + "\n")
        argv += ["-H", f"@{hfile}"]
    out = bed.run(host, argv + [url], user=user, check=True).stdout
    body, _ignored, code = out.rpartition("\n")
    return int(code), body


def assert_no_secret_in_argv(secret: str) -> None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            assert secret.encode() not in cmd, f"secret in argv of pid {entry}"


SID_RE = re.compile(r"[a-z0-9-]+")
