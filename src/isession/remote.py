"""Ask a resource's scheduler about many jobs, cheaply, once a second.

Why not ``ansible``/ansible-runner per poll: one ad-hoc module run costs ~1-2 s of CPU on the
workspace (interpreter start, inventory, AnsiballZ build, a python start on the controller) even
with ControlPersist, so one poll per second per resource would keep a core busy. Instead the
watcher keeps ONE ``ssh`` session per resource (``ControlMaster``/``ControlPersist`` so a
reconnect is cheap) running ``python3 -c BOOT`` on the controller. BOOT reads the collection's
scheduler ``module_utils`` sources (the very code ``scheduler_job_info`` runs) from stdin into an
in-memory importer and then answers one JSON line per JSON request line. A poll then costs one
``squeue --json`` on the controller plus a round trip. No file is written on the controller, no
secret is involved, the argv is constant.

Requests (``path``/``env``: the resource's ``isession_scheduler_path``/``isession_scheduler_env``, optional):
``{"op": "query", "scheduler": S, "job_ids": [...], "timeout": T, "state_dir": D?, "path": P?, "env": E?}`` ->
``{"jobs": {id: JobInfo dict}, "reachable": bool, "error": str}``;
``{"op": "tail", "dir": D, "lines": N}`` -> ``{"files": {name: text}}`` (log files only, never the secret);
``{"op": "cancel", "scheduler": S, "job_id": J, "state_dir": D?, "tunnel": {"state_dir": T, "name": N}?,
"owner": O?, "path": P?, "env": E?}`` -> ``{"cancelled": bool, "tunnel_stopped": bool, "released": [ports],
"error": str}``: what the cancel playbook's remote tasks do (``scheduler_submit`` absent, ``reverse_tunnel``
absent, ``free_port`` absent), through the same module_utils calls, for the watcher to honour a cancel request at
once (watcher.py, "fast cancel").
"""
from __future__ import annotations

import json
import os
import select
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

PKG = "ansible_collections.hpc.interactive.plugins.module_utils"
SHIPPED = ("_cmd", "_schedulers/__init__", "_schedulers/_base", "_schedulers/_hostlist", "_schedulers/local",
           "_schedulers/pbs", "_schedulers/sge", "_schedulers/slurm", "_schedulers/_runtime", "_ports", "_tunnel")

# Runs on the controller: an in-memory importer for the shipped sources, then SERVER.
BOOT = r"""
import sys, json, importlib.abc, importlib.util
n = int(sys.stdin.buffer.readline())
S = json.loads(sys.stdin.buffer.read(n).decode())
class F(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name in S:
            return importlib.util.spec_from_loader(name, self, is_package=S[name][0])
    def create_module(self, spec):
        return None
    def exec_module(self, m):
        pkg, src = S[m.__name__]
        if pkg:
            m.__path__ = []
        exec(compile(src, "<isession>/" + m.__name__, "exec"), m.__dict__)
sys.meta_path.insert(0, F())
exec(compile(S["__main__"][1], "<isession>/server", "exec"), {"__name__": "isession_server"})
"""

SERVER = r"""
import json, os, shutil, sys
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers import get_backend
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._runtime import make_runner
try:
    from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._runtime import scheduler_setup
except ImportError:  # a collection older than scheduler_path/scheduler_env
    scheduler_setup = None
RUNNERS = {}
def runner_for(req):
    # the resource's scheduler_path/scheduler_env (inventory), checked like the modules check them
    key = json.dumps([req.get("path") or [], req.get("env") or {}], sort_keys=True)
    if key not in RUNNERS:
        if scheduler_setup is None:
            if req.get("path") or req.get("env"):
                raise ValueError("this collection is too old for isession_scheduler_path/_env; update it")
            RUNNERS[key] = make_runner(shutil.which)
        else:
            RUNNERS[key] = make_runner(shutil.which, *scheduler_setup(req.get("path"), req.get("env")))
    return RUNNERS[key]
LOGS = (".log", ".out", ".err", ".error")
def expand(d):
    return os.path.expanduser(d) if d else None
def cancel(req):
    # the cancel playbook's remote steps, in its order: the job (or the detached agent), the tunnel, the ports
    b = get_backend(req["scheduler"], state_dir=expand(req.get("state_dir")))
    runner = runner_for(req)
    job, timeout = str(req["job_id"]), float(req.get("timeout", 5))
    ans = {"cancelled": False, "tunnel_stopped": False, "released": [], "error": ""}
    info = b.query(runner, job_ids=[job], timeout=timeout).jobs.get(job)
    if info is not None and info.alive:
        if req["scheduler"] == "local":
            ans["cancelled"] = bool(b.cancel(job_id=job))
        else:
            out, failed = b.cancel_checked(runner, job, timeout, timeout)
            ans["cancelled"] = out.ok
            if failed:
                ans["error"] = "cancel of job %s failed: %s" % (job, (out.stderr or out.stdout).strip())
    tunnel = req.get("tunnel")
    if tunnel:
        from ansible_collections.hpc.interactive.plugins.module_utils import _tunnel
        ans["tunnel_stopped"] = _tunnel.stop_tunnel(expand(tunnel["state_dir"]), tunnel["name"])
    if req.get("owner"):
        from ansible_collections.hpc.interactive.plugins.module_utils import _ports
        rdir = _ports.ReservationDir()
        ans["released"] = rdir.release(req["owner"]) if rdir.exists() else []
    return ans
def tail(d, lines):
    d = os.path.expanduser(d)
    out = {}
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        p = os.path.join(d, name)
        if name.startswith("secret") or not name.endswith(LOGS) or os.path.islink(p) or not os.path.isfile(p):
            continue
        with open(p, "rb") as fh:
            fh.seek(max(0, os.path.getsize(p) - 262144))
            out[name] = "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
    return {"files": out}
for line in sys.stdin.buffer:
    try:
        req = json.loads(line)
        if req.get("op") == "tail":
            ans = tail(req["dir"], int(req.get("lines", 200)))
        elif req.get("op") == "cancel":
            ans = cancel(req)
        else:
            b = get_backend(req["scheduler"], state_dir=expand(req.get("state_dir")))
            r = b.query(runner_for(req), job_ids=[str(j) for j in req["job_ids"]], timeout=float(req.get("timeout", 5)))
            ans = {"jobs": {k: v.as_dict() for k, v in r.jobs.items()}, "reachable": r.reachable, "error": r.error}
    except Exception as exc:
        ans = {"error": "%s: %s" % (type(exc).__name__, exc), "reachable": False, "jobs": {}}
    sys.stdout.write(json.dumps(ans) + "\n")
    sys.stdout.flush()
"""


def payload(mu_dir: Path) -> bytes:
    """The sources BOOT loads: the scheduler module_utils as importable packages, plus SERVER."""
    sources: Dict[str, List[Any]] = {}
    parts = PKG.split(".")
    for i in range(1, len(parts) + 1):
        sources[".".join(parts[:i])] = [True, ""]
    for rel in SHIPPED:
        text = (mu_dir / f"{rel}.py").read_text(encoding="utf-8")
        if rel.endswith("/__init__"):
            sources[f"{PKG}.{rel[:-9].replace('/', '.')}"] = [True, text]
        else:
            sources[f"{PKG}.{rel.replace('/', '.')}"] = [False, text]
    sources["__main__"] = [False, SERVER]
    body = json.dumps(sources).encode()
    return str(len(body)).encode() + b"\n" + body


def control_dir(base: str = "/tmp") -> Optional[Path]:  # noqa: S108 - a private 0700 dir, checked below
    """A short private directory for ssh control sockets (a socket path must stay under ~104 bytes).

    None when it cannot be made safely (exists but is not ours or not 0700): then no master is used.
    """
    path = Path(base) / f"isession-cm-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if st.st_uid != os.getuid() or (st.st_mode & 0o077) or not path.is_dir() or path.is_symlink():
        return None
    return path


def ssh_argv(conn: Mapping[str, Any], cm_dir: Optional[Path], command: List[str]) -> List[str]:
    """``ssh`` to the resource with a reused master connection; ``conn`` = host, user, port, key."""
    argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=2"]
    if cm_dir is not None:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={cm_dir}/cm-%C", "-o", "ControlPersist=120"]
    else:
        argv += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    if conn.get("port"):
        argv += ["-p", str(int(conn["port"]))]
    if conn.get("key"):
        argv += ["-i", str(conn["key"])]
    if conn.get("user"):
        argv += ["-l", str(conn["user"])]
    # ssh hands the remote login shell ONE string: quote every argument so none is re-split or expanded
    return [*argv, "--", str(conn["host"]), " ".join(shlex.quote(c) for c in command)]


class RemoteError(RuntimeError):
    """The connection broke or an answer did not come in time (the resource counts as unreachable)."""


class RemoteServer:
    """One long-lived ``python3`` on a resource, spoken to over one ssh session."""

    def __init__(self, conn: Mapping[str, Any], mu_dir: Path, local: bool = False) -> None:
        self.conn = dict(conn)
        self.local = local  # run the server here instead of over ssh (tests, the workspace itself)
        self.mu_dir = mu_dir
        self.proc: Optional[subprocess.Popen] = None
        self._buf = b""
        # one request/answer at a time: the watcher's per-scheduler threads share this connection,
        # and interleaved requests would hand one thread the other's answer
        self._lock = threading.Lock()

    def start(self) -> None:
        python = str(self.conn.get("python") or "/usr/bin/python3")
        command = [python, "-c", BOOT]
        argv = command if self.local else ssh_argv(self.conn, control_dir(), command)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, "LC_ALL": "C"})
        assert self.proc.stdin is not None
        self.proc.stdin.write(payload(self.mu_dir))
        self.proc.stdin.flush()
        self._buf = b""

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                pass
            self.proc.wait()
            self.proc = None

    def ask(self, request: Mapping[str, Any], timeout: float) -> Dict[str, Any]:
        """One request, one answer within ``timeout`` s; on any trouble the session is closed."""
        with self._lock:
            return self._ask(request, timeout)

    def _ask(self, request: Mapping[str, Any], timeout: float) -> Dict[str, Any]:
        try:
            if self.proc is None or self.proc.poll() is not None:
                self.close()
                self.start()
            assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            return json.loads(self._readline(timeout))
        except (OSError, ValueError, RemoteError) as exc:
            self.close()
            raise RemoteError(str(exc) or type(exc).__name__) from None

    def _readline(self, timeout: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteError(f"no answer from {self.conn.get('host')} within {timeout:.0f} s")
            ready, _ignored, _ignored = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RemoteError(f"connection to {self.conn.get('host')} closed")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line


def inventory_conn(inventory: Optional[Path], resource: str) -> Dict[str, Any]:
    """Connection facts of ``resource`` from an Ansible inventory (ansible_host/user/port/key/python)."""
    if inventory is None:
        raise LookupError(f"resource {resource!r}: no inventory (use --inventory or $ISESSION_INVENTORY)")
    from ansible.inventory.manager import InventoryManager  # noqa: PLC0415 - only the watcher/doctor need it
    from ansible.parsing.dataloader import DataLoader  # noqa: PLC0415
    from ansible.vars.manager import VariableManager  # noqa: PLC0415

    loader = DataLoader()
    inv = InventoryManager(loader=loader, sources=[str(inventory)])
    host = inv.get_host(resource)
    if host is None:
        raise LookupError(f"resource {resource!r} is not a host in {inventory}")
    hv = VariableManager(loader=loader, inventory=inv).get_vars(host=host, include_hostvars=False)

    def plain(key: str) -> Optional[str]:
        value = hv.get(key)
        if value is None or "{{" in str(value):
            return None
        return str(value)

    path, env = hv.get("isession_scheduler_path") or [], hv.get("isession_scheduler_env") or {}
    if "{{" in json.dumps([path, env], default=str):
        path, env = [], {}  # templated: only a play can tell; the watcher then finds the commands on PATH or not
    return {"host": plain("ansible_host") or resource, "user": plain("ansible_user"),
            "scheduler_path": [str(d) for d in path] if isinstance(path, list) else [],
            "scheduler_env": {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {},
            "port": plain("ansible_port"), "key": plain("ansible_ssh_private_key_file"),
            "python": plain("ansible_python_interpreter") or "/usr/bin/python3",
            "scheduler": plain("isession_scheduler"), "remote_root": plain("isession_remote_root")}
