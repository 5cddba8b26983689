"""Secret audit: one session per service, started with the ``isession`` CLI (real ansible-runner, so there are runner
artifacts), on a mix of targets: nginx on the workspace, jupyterlab on Slurm compute, notebook on the controller,
code_server on PBS compute (the PBS commands jump through the controller).

While all four run, and again after they are cancelled, every session's secret is looked for in:
- every file of the workspace session dirs (state, service.json, logs, runner artifacts and events) and of the
  cluster session dirs (job script, agent/service fragments, job output, server and tunnel logs, app config);
- every file written since the test began under /tmp, /var/tmp (the bed: Slurm's saved job scripts and
  environments, slurmd spools, daemon logs), /dev/shm, /var/log and the bed users' homes;
- ``scontrol show job -dd`` and ``scontrol write batch_script JOBID -`` of the batch jobs;
- ``ps -eww -o args`` in every bed host, and ``/proc/*/environ`` and ``cmdline`` of every process.
The secret may only be in files of mode 0600 owned by the session's user, and never in a log, a runner
artifact, a job script, the session record, argv or an environment. Positive controls make each look count: the
scan must find the ``secret`` files themselves, the scheduler's stored copy of each job script, and processes of
every session on the host it runs on.
"""
from __future__ import annotations

import os
import pwd
import re
import stat
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import Cli  # noqa: E402
from test_matrix import BED_HOSTS, session_processes_by_host  # noqa: E402
from sessions_common import WS_USER, listening, read_json, wait_until  # noqa: E402
from test_sessions_compute import queue  # noqa: E402

pytestmark = pytest.mark.bed

# (service, --target, --resource): one per service, every kind of target
SESSIONS = [
    ("nginx", "workspace", None),
    ("jupyterlab", "compute", "controller"),
    ("notebook", "controller", "controller"),
    ("code_server", "compute", "controller_pbs"),
]
SCAN_ROOTS = ("/tmp", "/var/tmp", "/dev/shm", "/var/log", "/home")
MAX_BYTES = 8 * 1024 * 1024
# where the secret must never be, whatever the file mode
FORBIDDEN = [
    (re.compile(r"/logs/runner/"), "a runner artifact"),
    (re.compile(r"/logs/|\.log$|/job\.out$|\.[oe]\d+$"), "a log"),
    (re.compile(r"/(agent|service)\.sh$"), "a job script or agent fragment"),
    (re.compile(r"/(state|service|agent)\.json$"), "the session record"),
]


def audit_inventory(bed, cli_user: str = WS_USER) -> Path:
    """The bed inventory with two resources on the same controller: ``controller`` (Slurm, direct tunnels) and
    ``controller_pbs`` (the PBS commands, tunnels through the controller)."""
    line = "controller ansible_host=10.199.77.20 ansible_user=cluser"
    text = bed.inventory_path.read_text()
    assert line in text, "bed inventory changed shape"
    ws = "isession_workspace_address=10.199.77.10 isession_workspace_user=wsuser"
    text = text.replace(line, f"{line} isession_scheduler=slurm {ws} isession_tunnel_via=direct\n"
                              f"controller_pbs ansible_host=10.199.77.20 ansible_user=cluser "
                              f"isession_scheduler=pbs {ws} isession_tunnel_via=controller")
    return bed.write_user_file(cli_user, bed.user_tmpdir(cli_user) / "inventory.ini", text, mode=0o644)


def files_under(roots: Iterable[str], since: float) -> Iterable[Path]:
    """Regular files (not symlinks) under ``roots`` changed at or after ``since``, up to MAX_BYTES."""
    for top in roots:
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            if dirpath.startswith("/proc"):
                dirnames[:] = []
                continue
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_BYTES and \
                        max(st.st_mtime, st.st_ctime) >= since:
                    yield Path(path)


def scan(roots: Iterable[str], since: float, secrets: Dict[str, str]) -> Dict[Path, List[str]]:
    """{file: [session ids whose secret it holds]}."""
    needles = {sid: s.encode() for sid, s in secrets.items()}
    hits: Dict[Path, List[str]] = {}
    for path in files_under(roots, since):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found = [sid for sid, n in needles.items() if n in data]
        if found:
            hits[path] = found
    return hits


def violations(hits: Dict[Path, List[str]], owners: Dict[str, str]) -> List[str]:
    """Files that hold a secret where they must not: a mode other than 0600, another owner, a forbidden kind."""
    out = []
    for path, sids in sorted(hits.items()):
        try:
            st = os.lstat(path)
        except OSError:
            continue  # gone since the scan (a temporary file of a running program)
        mode, owner = stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name
        if mode != 0o600:
            out.append(f"{path}: mode {oct(mode)} holds the secret of {sids}")
        if owner not in {owners[s] for s in sids} | {WS_USER}:
            out.append(f"{path}: owned by {owner} holds the secret of {sids}")
        for pattern, kind in FORBIDDEN:
            if pattern.search(str(path)):
                out.append(f"{path}: {kind} holds the secret of {sids}")
    return out


def processes_holding(secrets: Dict[str, str]) -> List[str]:
    """Processes whose argv or environment holds a secret (every process of the machine)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for part in ("cmdline", "environ"):
            try:
                data = Path("/proc", entry, part).read_bytes()
            except OSError:
                continue
            out += [f"pid {entry} {part} holds the secret of {sid}" for sid, s in secrets.items()
                    if s.encode() in data]
    return out


def audit(bed, cli: Cli, info: Dict[str, dict], since: float, phase: str) -> Dict[Path, List[str]]:
    secrets = {sid: i["secret"] for sid, i in info.items()}
    roots = [str(cli.root), *SCAN_ROOTS]
    hits = scan(roots, since, secrets)
    print(f"\n[{phase}] files holding a secret (all 0600):")
    for path, sids in sorted(hits.items()):
        print(f"  {oct(stat.S_IMODE(os.lstat(path).st_mode)) if path.exists() else '-'} {path} {sids}")
    # positive controls: the scan reads the session dirs on both sides
    for sid, i in info.items():
        assert sid in hits.get(cli.root / sid / "secret", []), f"the scan missed {cli.root / sid / 'secret'}"
        if i["rdir"]:
            assert sid in hits.get(i["rdir"] / "secret", []), f"the scan missed {i['rdir'] / 'secret'}"
    bad = violations(hits, {sid: i["owner"] for sid, i in info.items()})
    assert bad == [], "\n".join(bad)
    # runner artifacts: none at all holds a secret (not even a 0600 one)
    for sid in info:
        runner = cli.root / sid / "logs" / "runner"
        assert (runner / "artifacts").is_dir(), f"no runner artifacts in {runner}"
        assert [p for p in hits if runner in p.parents] == []
    for host in BED_HOSTS:
        ps = bed.run(host, ["ps", "-eww", "-o", "args="], check=True).stdout
        assert len(ps.splitlines()) > 5, f"ps in {host} saw too little: {ps!r}"
        assert not [sid for sid, s in secrets.items() if s in ps], f"a secret is in ps argv in {host}"
    assert processes_holding(secrets) == []
    return hits


def slurm_job_id(bed, sid: str) -> str:
    line = queue(bed, f"isession-{sid}")
    assert line, f"no job named isession-{sid} in the queue"
    return line.split()[0]


def test_no_secret_outside_0600_files_argv_or_environ(bed, apps):
    since = time.time() - 1
    inv = audit_inventory(bed)
    cli = Cli(bed, inventory=inv)
    stamp = f"{os.getpid()}-{int(time.time()) % 100000}"
    info: Dict[str, dict] = {}
    started: List[str] = []
    try:
        for service, target, resource in SESSIONS:
            sid = f"audit-{service.replace('_', '')}-{stamp}"
            argv = ["start", service, "--id", sid, "--target", target, "-e", "session_start_timeout=120"]
            if resource:
                argv += ["--resource", resource]
            t0 = time.monotonic()
            cp = cli.run(*argv, timeout=300)
            started.append(sid)
            assert cp.returncode == 0, f"isession {' '.join(argv)}:\n{cp.stdout}\n{cp.stderr}"
            print(f"{service} on {target} ({resource or 'workspace'}): {time.monotonic() - t0:.1f} s")
            assert cli.service(sid)["JOB_STATUS"] == "Running"
            state = cli.state(sid)
            secret = (cli.root / sid / "secret").read_text().strip()
            assert len(secret) >= 32
            assert secret not in cp.stdout and secret not in cp.stderr
            rdir = Path(state["remote_dir"]) if state.get("remote_dir") else None
            host = ("workspace" if target == "workspace" else "controller" if target == "controller"
                    else read_json(rdir / "agent.json")["host"])
            info[sid] = dict(service=service, target=target, secret=secret, rdir=rdir, host=host,
                             owner=WS_USER if target == "workspace" else "cluser",
                             port=int(state["ports"]["workspace"]))

        # the scheduler's copies of the batch jobs: the script it keeps, the job's record
        for sid, i in info.items():
            if i["target"] != "compute":
                continue
            job = slurm_job_id(bed, sid)
            script = bed.slurm(["scontrol", "write", "batch_script", job, "-"]).stdout
            assert "hpc.interactive session agent" in script and sid in script, script[:300]
            assert i["secret"] not in script, f"the secret is in the batch script of job {job}"
            shown = bed.slurm(["scontrol", "show", "job", "-dd", job]).stdout
            assert f"JobId={job}" in shown and i["secret"] not in shown
            assert i["secret"] not in (i["rdir"] / "agent.sh").read_text()
        # processes of every session, found on the host they run on (so the environ scan covered them)
        for sid, i in info.items():
            procs = session_processes_by_host(bed, sid)
            assert procs.get(i["host"]), f"no process of {sid} on {i['host']}: {procs}"

        hits = audit(bed, cli, info, since, "running")
        stored = [p for p in files_under([str(bed.slurm_dir)], since)
                  if any(sid.encode() in p.read_bytes() for sid, i in info.items() if i["target"] == "compute")]
        assert stored, f"found no job script or environment stored by Slurm under {bed.slurm_dir}"
        assert not [p for p in hits if bed.slurm_dir in p.parents]

        for sid in reversed(started):
            cc = cli.run("cancel", sid, timeout=120)
            assert cc.returncode == 0, cc.stdout + cc.stderr
            assert info[sid]["secret"] not in cc.stdout + cc.stderr
        started.clear()
        for sid, i in info.items():
            assert cli.service(sid)["JOB_STATUS"] == "Cancelled"
            assert wait_until(lambda s=sid: not session_processes_by_host(bed, s), 15), \
                session_processes_by_host(bed, sid)
            assert wait_until(lambda p=i["port"]: not listening(bed, "workspace", p), 10)
            if i["target"] == "compute":
                assert wait_until(lambda s=sid: queue(bed, f"isession-{s}") == "", 10)
        # what the servers and the cancel runs wrote on the way out
        audit(bed, cli, info, since, "cancelled")
    finally:
        for sid in started:
            cli.run("cancel", sid, timeout=120)
        cli.stop_watcher()
