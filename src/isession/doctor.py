"""``isession doctor``: preflight checks, one line each (ok / warn / FAIL).

Always: the workspace (collection, ansible-runner, session root, ssh keys, watcher) and, per resource, that the
controller answers over ssh with python3 and the scheduler's commands. With ``--service S``: S's binaries (the
``binaries`` of the role's ``session_service_spec``, rendered from the role's defaults/vars and ``-e`` inputs,
i.e. the very names the session agent checks with ``command -v`` before it starts the server) where S's
sessions would run:

* workspace: here, as you, with your environment;
* controller: on the controller, over the same ssh as Ansible uses (the agent's environment there);
* compute: Slurm: in a one-task probe step on a compute node (``srun --immediate``, the session's partition,
  account, qos and constraint inputs), as a job sees it; when no node is free within a few seconds, or for
  PBS/SGE (no cheap probe job), compute nodes are NOT checked: the controller's answer is shown instead, with a
  warning saying so (jobs share the controller's home, not necessarily its /opt or /usr).

A missing binary is one FAIL line in the agent's words: ``<binary> not found on <host>``. The session's
modules, venv/conda env and setup commands are not applied (a warning says so when such inputs are given).
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .collection import active, find_collection
from .remote import control_dir, inventory_conn, ssh_argv

SCHEDULER_COMMANDS = {"slurm": ("sbatch", "squeue", "scancel"), "pbs": ("qsub", "qstat", "qdel"),
                      "sge": ("qsub", "qstat", "qdel"), "local": ("setsid",)}
Check = Tuple[str, str, str]  # level, what, detail
TARGETS = ("workspace", "controller", "compute")
# Prints the host, then "ok NAME" / "missing NAME" per argument; bash's `command -v`, as the agent checks.
PROBE = ('printf "host %s\\n" "$(hostname)"; for c in "$@"; do if command -v "$c" >/dev/null 2>&1; '
         'then printf "ok %s\\n" "$c"; else printf "missing %s\\n" "$c"; fi; done')
PROBE_WAIT = 10  # s: srun --immediate, how long the probe step may wait for a compute node
# session inputs that become srun options of the probe step
SRUN_OPTIONS = (("session_partition", "--partition"), ("session_account", "--account"), ("session_qos", "--qos"),
                ("session_constraint", "--constraint"))
ENV_INPUTS = ("session_modules", "session_venv", "session_conda_env", "session_setup_commands")


def check_local(root: Path) -> List[Check]:
    out: List[Check] = []
    try:
        col = active() or find_collection()
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
    from .watchfiles import running_pid  # noqa: PLC0415

    pid = running_pid(root) if root.exists() else None
    out.append(("ok" if pid else "warn", "watcher", f"pid {pid}" if pid else "not running (starts with a session)"))
    return out


def resources(inventory: Path) -> List[str]:
    from ansible.inventory.manager import InventoryManager  # noqa: PLC0415
    from ansible.parsing.dataloader import DataLoader  # noqa: PLC0415

    inv = InventoryManager(loader=DataLoader(), sources=[str(inventory)])
    hosts = inv.get_groups_dict().get("cluster") or [
        h.name for h in inv.get_hosts() if "isession_scheduler" in h.get_vars()]
    return list(hosts)


def check_resource(inventory: Path, resource: str) -> List[Check]:
    try:
        conn = inventory_conn(inventory, resource)
    except LookupError as exc:
        return [("FAIL", resource, str(exc))]
    scheduler = conn.get("scheduler") or "slurm"
    wanted = ["python3", *SCHEDULER_COMMANDS.get(scheduler, ())]
    # the scheduler's own bin dirs first, as the modules search them (isession_scheduler_path)
    script = ('[ -n "$1" ] && PATH="$1:$PATH"; shift; '
              'for c in "$@"; do command -v "$c" >/dev/null 2>&1 && echo "ok $c" || echo "missing $c"; done')
    path = ":".join(conn.get("scheduler_path") or [])
    argv = ssh_argv(conn, control_dir(), ["sh", "-c", script, "sh", path, *wanted])
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


# ---------------------------------------------------------------- a service's binaries
def _load_yaml(loader: Any, path: Path) -> Any:
    try:
        return loader.load_from_file(str(path), trusted_as_template=True)  # ansible-core >= 2.19
    except TypeError:
        return loader.load_from_file(str(path))


def _trusted(value: Any) -> Any:
    """``-e`` values are templated like Ansible's extra vars (ansible-core >= 2.19 templates only trusted text)."""
    try:
        from ansible.template import trust_as_template  # noqa: PLC0415
    except ImportError:
        return value
    return trust_as_template(value) if isinstance(value, str) else value


def _spec_binaries(tasks: Any) -> Optional[List[Any]]:
    """The ``binaries`` of the first ``set_fact: session_service_spec`` in a task list (or None)."""
    for task in tasks if isinstance(tasks, list) else []:
        if not isinstance(task, dict):
            continue
        for key in ("ansible.builtin.set_fact", "set_fact"):
            spec = (task.get(key) or {}).get("session_service_spec") if isinstance(task.get(key), dict) else None
            if isinstance(spec, dict) and "binaries" in spec:
                return list(spec["binaries"] or [])
        for key in ("block", "rescue", "always"):
            found = _spec_binaries(task.get(key))
            if found is not None:
                return found
    return None


def service_binaries(col_path: Path, service: str, inputs: Optional[Mapping[str, Any]] = None) -> List[str]:
    """The binaries the role's ``session_service_spec`` names, rendered with its defaults, vars and ``inputs``.

    LookupError (with the reason in words) for an unknown service or a spec that cannot be rendered.
    """
    from ansible.parsing.dataloader import DataLoader  # noqa: PLC0415 - only doctor --service needs Ansible here
    from ansible.template import Templar  # noqa: PLC0415

    role = col_path / "roles" / service
    if not (col_path / "playbooks" / f"start_{service}.yml").is_file() or not role.is_dir():
        from .describe import services  # noqa: PLC0415

        raise LookupError(f"no service {service!r} (services: {', '.join(services(col_path)) or 'none'})")
    loader = DataLoader()
    binaries = None
    for path in sorted((role / "tasks").glob("*.yml")):
        binaries = _spec_binaries(_load_yaml(loader, path))
        if binaries is not None:
            break
    if binaries is None:
        raise LookupError(f"the {service} role sets no session_service_spec.binaries")
    variables: Dict[str, Any] = {}
    for part in ("defaults", "vars"):  # Ansible's precedence: role defaults < role vars < extra vars
        path = role / part / "main.yml"
        if path.is_file():
            variables.update(_load_yaml(loader, path) or {})
    variables.update({k: _trusted(v) for k, v in (inputs or {}).items()})
    try:
        rendered = Templar(loader=loader, variables=variables).template(binaries)
    except Exception as exc:  # noqa: BLE001 - any templating error is reported, with Ansible's words
        raise LookupError(f"cannot work out the {service} binaries: {exc}") from None
    return [str(b) for b in rendered if str(b)]


def _probe(argv: Sequence[str], timeout: float) -> Tuple[Optional[str], Dict[str, bool], str]:
    """Run a PROBE command: (host, {binary: found}, error). ``host`` is None when it did not run."""
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                            env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        return None, {}, f"no answer within {timeout:.0f} s"
    except OSError as exc:
        return None, {}, str(exc)
    host, found = None, {}
    for line in cp.stdout.splitlines():
        word, _ignored, rest = line.partition(" ")
        if word == "host":
            host = rest
        elif word in ("ok", "missing"):
            found[rest] = word == "ok"
    if cp.returncode != 0 or host is None:
        why = (cp.stderr.strip().splitlines() or [f"rc={cp.returncode}"])[-1]
        return None, found, why
    return host, found, ""


def _binary_checks(what: str, host: str, wanted: Sequence[str], found: Mapping[str, bool]) -> List[Check]:
    missing = [b for b in wanted if not found.get(b)]
    out: List[Check] = [("FAIL", what, f"{b} not found on {host}") for b in missing]
    present = [b for b in wanted if found.get(b)]
    if present:
        out.insert(0, ("ok", what, f"on {host}: {', '.join(present)}"))
    return out


def check_service_workspace(service: str, wanted: Sequence[str]) -> List[Check]:
    what = f"{service}@workspace"
    host, found, err = _probe(["bash", "-c", PROBE, "bash", *wanted], timeout=20)
    if host is None:
        return [("FAIL", what, f"cannot check here: {err}")]
    return _binary_checks(what, host, wanted, found)


def check_service_resource(inventory: Path, resource: str, service: str, wanted: Sequence[str], *,
                           targets: Sequence[str], inputs: Mapping[str, Any]) -> List[Check]:
    """The binaries on the controller and/or (Slurm) a compute node of ``resource``."""
    try:
        conn = inventory_conn(inventory, resource)
    except LookupError as exc:
        return [("FAIL", resource, str(exc))]
    scheduler = conn.get("scheduler") or "slurm"
    out: List[Check] = []
    host, found, err = _probe(ssh_argv(conn, control_dir(), ["bash", "-c", PROBE, "bash", *wanted]), timeout=30)
    if host is None:
        return [("FAIL", f"{service}@{resource}", f"cannot check on {conn['host']}: {err}")]
    if "controller" in targets:
        out += _binary_checks(f"{service}@{resource}", host, wanted, found)
    if "compute" not in targets:
        return out
    what = f"{service}@{resource}/compute"
    if scheduler == "slurm":
        srun = ["srun", f"--immediate={PROBE_WAIT}", "--quiet", "--job-name=isession-doctor", "--nodes=1",
                "--ntasks=1", "--time=1"]
        srun += [f"{opt}={inputs[key]}" for key, opt in SRUN_OPTIONS if inputs.get(key)]
        probe = [*srun, "bash", "-c", PROBE, "bash", *wanted]
        node, node_found, node_err = _probe(ssh_argv(conn, control_dir(), probe), timeout=PROBE_WAIT + 30)
        if node is not None:
            return out + _binary_checks(what, node, wanted, node_found)
        why = f"no probe step ran (srun: {node_err})"
    else:
        why = f"no cheap probe job with {scheduler}"
    out.append(("warn", what, f"compute nodes NOT checked: {why}; checked on the controller {host} instead"))
    return out + _binary_checks(what, host, wanted, found)


def check_service(inventory: Optional[Path], names: Sequence[str], service: str, target: Optional[str],
                  inputs: Mapping[str, Any]) -> List[Check]:
    """``doctor --service``: the service's binaries on every target asked for (default: all that exist)."""
    try:
        wanted = service_binaries((active() or find_collection()).path, service, inputs)
    except LookupError as exc:
        return [("FAIL", service, str(exc))]
    out: List[Check] = []
    if not wanted:
        return [("ok", service, "the service names no binaries to check")]
    used_env = [k for k in ENV_INPUTS if inputs.get(k)]
    if used_env:
        out.append(("warn", service, f"{', '.join(used_env)} not applied here: a binary found only after them "
                                     "shows as missing"))
    targets = [target] if target else list(TARGETS)
    if "workspace" in targets:
        out += check_service_workspace(service, wanted)
    cluster = [t for t in targets if t != "workspace"]
    if cluster and (inventory is None or not names):
        if target:
            out.append(("FAIL", f"{service}@{target}", "needs a resource (--resource and an inventory)"))
        return out
    for name in names if cluster else []:
        out += check_service_resource(inventory, name, service, wanted, targets=cluster, inputs=inputs)
    return out


def gather_checks(root: Path, inventory: Optional[Path], only: Optional[str] = None, *,
                  service: Optional[str] = None, target: Optional[str] = None,
                  inputs: Optional[Mapping[str, Any]] = None) -> List[Check]:
    """Every check ``isession doctor`` makes, in order: the workspace, each resource, the service's binaries."""
    checks = check_local(root)
    names: List[str] = []
    unreachable = set()
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
            found = check_resource(inventory, name)
            if found and found[0][0] == "FAIL" and found[0][1] == name:
                unreachable.add(name)
            checks += found
    if service:
        checks += check_service(inventory, [n for n in names if n not in unreachable], service, target,
                                inputs or {})
    return checks


def format_checks(checks: Sequence[Check]) -> str:
    return "\n".join(f"{level:<5} {what:<18} {detail}" for level, what, detail in checks)


def run_checks(root: Path, inventory: Optional[Path], only: Optional[str] = None,
               emit: Callable[[str], None] = print, *, service: Optional[str] = None, target: Optional[str] = None,
               inputs: Optional[Mapping[str, Any]] = None) -> int:
    """Print the checks, one line each; 1 when one FAILed."""
    checks = gather_checks(root, inventory, only, service=service, target=target, inputs=inputs)
    emit(format_checks(checks))
    return 1 if any(level == "FAIL" for level, _ignored, _ignored in checks) else 0
