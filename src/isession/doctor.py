"""``isession doctor``: preflight checks, one line each (ok / warn / FAIL)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .collection import find_collection
from .remote import control_dir, inventory_conn, ssh_argv

SCHEDULER_COMMANDS = {"slurm": ("sbatch", "squeue", "scancel"), "pbs": ("qsub", "qstat", "qdel"),
                      "sge": ("qsub", "qstat", "qdel"), "local": ("setsid",)}
Check = Tuple[str, str, str]  # level, what, detail


def check_local(root: Path) -> List[Check]:
    out: List[Check] = []
    try:
        col = find_collection()
        plays = sorted(p.stem for p in (col.path / "playbooks").glob("start_*.yml"))
        out.append(("ok", "collection", f"hpc.interactive {col.version} at {col.path}"))
        out.append(("ok" if plays else "FAIL", "services", ", ".join(p[6:] for p in plays) or "no start playbooks"))
    except LookupError as exc:
        out.append(("FAIL", "collection", str(exc)))
    try:
        import ansible_runner  # noqa: F401, PLC0415

        out.append(("ok", "ansible-runner", "importable"))
    except ImportError as exc:
        out.append(("FAIL", "ansible-runner", str(exc)))
    out.append(("ok" if shutil.which("ansible-playbook") or Path(os.sys.executable).with_name("ansible-playbook")
                .exists() else "FAIL", "ansible-playbook", "found" if shutil.which("ansible-playbook") else
                "next to the python running isession"))
    if root.exists():
        st = root.stat()
        mode_ok = stat.S_IMODE(st.st_mode) & 0o077 == 0 and st.st_uid == os.getuid()
        out.append(("ok" if mode_ok else "FAIL", "session root",
                    f"{root} ({oct(stat.S_IMODE(st.st_mode))}{'' if mode_ok else ', must be yours and 0700'})"))
    else:
        out.append(("ok", "session root", f"{root} (made at the first start)"))
    home = Path(os.environ.get("HOME") or Path.home())
    keys = [p for p in (home / ".ssh").glob("id_*") if not p.name.endswith(".pub")] if (home / ".ssh").is_dir() else []
    bad = [str(p) for p in keys if stat.S_IMODE(p.stat().st_mode) & 0o077]
    if not keys:
        out.append(("warn", "ssh keys", f"no ~/.ssh/id_* key (needed for cluster targets) in {home}"))
    else:
        out.append(("FAIL" if bad else "ok", "ssh keys", f"too open: {', '.join(bad)}" if bad else
                    ", ".join(p.name for p in keys)))
    from .watcher import running_pid  # noqa: PLC0415

    pid = running_pid(root) if root.exists() else None
    out.append(("ok" if pid else "warn", "watcher", f"pid {pid}" if pid else "not running (starts with a session)"))
    return out


def resources(inventory: Path) -> List[str]:
    from ansible.inventory.manager import InventoryManager  # noqa: PLC0415
    from ansible.parsing.dataloader import DataLoader  # noqa: PLC0415

    inv = InventoryManager(loader=DataLoader(), sources=[str(inventory)])
    hosts = inv.get_groups_dict().get("cluster") or [h.name for h in inv.get_hosts()
                                                      if "isession_scheduler" in h.get_vars()]
    return list(hosts)


def check_resource(inventory: Path, resource: str) -> List[Check]:
    try:
        conn = inventory_conn(inventory, resource)
    except LookupError as exc:
        return [("FAIL", resource, str(exc))]
    scheduler = conn.get("scheduler") or "slurm"
    wanted = ["python3", *SCHEDULER_COMMANDS.get(scheduler, ())]
    script = 'for c in "$@"; do command -v "$c" >/dev/null 2>&1 && echo "ok $c" || echo "missing $c"; done'
    argv = ssh_argv(conn, control_dir(), ["sh", "-c", script, "sh", *wanted])
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False,
                            env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        return [("FAIL", resource, f"ssh to {conn['host']} timed out")]
    if cp.returncode != 0:
        why = (cp.stderr.strip().splitlines() or [f"rc={cp.returncode}"])[-1]
        return [("FAIL", resource, f"ssh {conn.get('user') or ''}@{conn['host']}: {why}")]
    out: List[Check] = [("ok", resource, f"reachable as {conn.get('user') or 'you'}@{conn['host']}, "
                                         f"scheduler {scheduler}")]
    missing = [ln.split()[1] for ln in cp.stdout.splitlines() if ln.startswith("missing ")]
    out.append(("FAIL" if missing else "ok", f"{resource} commands",
                f"missing: {', '.join(missing)}" if missing else ", ".join(wanted)))
    return out


def run_checks(root: Path, inventory: Optional[Path], only: Optional[str] = None,
               emit: Callable[[str], None] = print) -> int:
    checks = check_local(root)
    if inventory is None:
        checks.append(("warn", "inventory", "none: only the workspace target is available"))
    else:
        checks.append(("ok", "inventory", str(inventory)))
        try:
            names = [only] if only else resources(inventory)
        except Exception as exc:  # noqa: BLE001 - an unparsable inventory is a finding, not a crash
            names = []
            checks.append(("FAIL", "inventory", f"cannot read {inventory}: {exc}"))
        for name in names:
            checks += check_resource(inventory, name)
    for level, what, detail in checks:
        emit(f"{level:<5} {what:<18} {detail}")
    return 1 if any(level == "FAIL" for level, _, _ in checks) else 0
