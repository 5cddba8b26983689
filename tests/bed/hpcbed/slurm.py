"""Slurm: munge, /etc/slurm/slurm.conf, slurmctld on the controller, slurmd on the compute hosts, and node
loss. The PBS commands (qsub, qstat, qdel) are Slurm's torque wrappers (slurm-wlm-torque, in ``PACKAGES``):
they need nothing of their own and answer as soon as slurmctld does."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

from hpcbed.core import COMPUTE_HOSTS, HOSTS, MARKER, Health, _pid_alive, _read_pid, _sh

SLURM_CONF = Path("/etc/slurm/slurm.conf")
SLURM_BACKUP = SLURM_CONF.with_name("slurm.conf.hpcbed-backup")
MUNGE_RUN = Path("/run/munge")
MUNGE_PID = MUNGE_RUN / "munged.pid"
STALE_DOWN_SECONDS = 300.0  # `up` resumes nodes downed longer ago (a test in progress may have downed a newer one)
_USABLE_NODE_STATES = ("idle", "mixed", "allocated", "completing")


class SlurmMixin:
    """munge, slurmctld and slurmd, and Slurm's client commands on the controller."""

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    def slurm(self, argv: Sequence[str], user: Optional[str] = None, check: bool = True,
              timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command on the controller (as root by default)."""
        return self.run("controller", list(argv), user=user, check=check, timeout=timeout, env={"LC_ALL": "C"})

    def node_state(self, name: str) -> str:
        """Slurm's long state of node ``name`` (e.g. ``idle``, ``down``, ``down*``)."""
        return self.slurm(["sinfo", "-h", "-N", "-n", name, "-o", "%T"]).stdout.split()[0]

    def node_down_for(self, name: str) -> float:
        """Seconds since ``name`` was marked down/drained by hand (0 when it is not)."""
        out = self.slurm(["scontrol", "show", "node", "-o", name], check=False).stdout
        state = re.search(r"\bState=(\S+)", out)
        if not state or not any(w in state.group(1) for w in ("DOWN", "DRAIN", "FAIL")):
            return 0.0
        stamp = re.search(r"\bReason=.*\[[^@\]]*@(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\]", out)
        if not stamp:
            return float("inf")
        return max(0.0, time.time() - time.mktime(time.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S")))

    def node_down(self, name: str, reason: str = "hpcbed test", timeout: float = 60) -> None:
        """Mark ``name`` DOWN (simulated node loss) and wait until Slurm reports it down."""
        self.slurm(["scontrol", "update", f"NodeName={name}", "State=DOWN", f"Reason={reason}"])
        # scontrol's State carries the DOWN flag at once; sinfo may say "mixed" while a job is killed
        self._wait(lambda: "DOWN" in self.node_flags(name), timeout, f"node {name} down")

    def node_flags(self, name: str) -> str:
        """``State=`` of ``scontrol show node`` (e.g. ``IDLE``, ``DOWN``, ``MIXED+DRAIN``)."""
        out = self.slurm(["scontrol", "show", "node", "-o", name], check=False).stdout
        m = re.search(r"\bState=(\S+)", out)
        return m.group(1) if m else ""

    def node_resume(self, name: str, timeout: float = 60) -> None:
        """Return ``name`` to service (when it is down/drained/failed) and wait until it is usable."""
        state = self.node_state(name).lower()
        if any(word in state for word in ("down", "drain", "fail")):
            self.slurm(["scontrol", "update", f"NodeName={name}", "State=RESUME"], check=False)
        self._wait(lambda: self.node_state(name).lower() in _USABLE_NODE_STATES, timeout,
                   f"node {name} usable after resume")

    def _start_munge(self) -> None:
        if _munge_ok():
            return
        MUNGE_RUN.mkdir(exist_ok=True)
        munge_pw = pwd.getpwnam("munge")
        os.chown(MUNGE_RUN, munge_pw.pw_uid, munge_pw.pw_gid)
        MUNGE_RUN.chmod(0o755)
        _sh(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"])
        self._wait(_munge_ok, 10, "munged answering")

    def _write_slurm_conf(self) -> None:
        if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text() and not SLURM_BACKUP.exists():
            shutil.copy2(SLURM_CONF, SLURM_BACKUP)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(_slurm_conf(self.slurm_dir))
        SLURM_CONF.chmod(0o644)

    def _start_slurmctld(self, deadline: float) -> None:
        self._daemon("controller", ["/usr/sbin/slurmctld", "-i"], "slurmctld")
        self._wait(lambda: "UP" in self.slurm(["scontrol", "ping"], check=False, timeout=15).stdout,
                   max(1.0, deadline - time.monotonic()), "slurmctld answering scontrol ping")

    def _start_slurmd(self, node: str) -> None:
        self._daemon(node, ["/usr/sbin/slurmd"], f"slurmd-{node}")

    def _slurm_health(self, h: Health) -> None:
        """slurmctld alive and answering ``scontrol ping``; each slurmd alive with its node responding."""
        pid = _read_pid(self.slurm_dir / "slurmctld.pid")
        ping = self.slurm(["scontrol", "ping"], check=False, timeout=15).stdout.strip() if pid else ""
        h.add("controller", "slurmctld", bool(pid and _pid_alive(pid) and "UP" in ping), f"pid {pid}: {ping}")
        states = {}
        if "UP" in ping:
            cp = self.slurm(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=15)
            states = dict(line.split(None, 1) for line in cp.stdout.splitlines() if line.strip())
        for node in COMPUTE_HOSTS:
            if not h.part_ok(node, ignore=("slurmd",)):
                continue
            pid = _read_pid(self.slurm_dir / f"slurmd-{node}.pid")
            state = states.get(node, "?")
            responding = state != "?" and not state.endswith("*") and "unknown" not in state \
                and "not_responding" not in state
            h.add(node, "slurmd", bool(pid and _pid_alive(pid) and responding), f"pid {pid}, node {state}")


def _munge_ok() -> bool:
    if not (MUNGE_RUN / "munge.socket.2").exists():
        return False
    try:
        cred = _sh(["munge", "-n"], check=False, timeout=5)
        return cred.returncode == 0 and _sh(["unmunge"], check=False, input_text=cred.stdout, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _slurm_conf(sd: Path) -> str:
    c = HOSTS["controller"]
    nodes = "\n".join(f"NodeName={n} NodeAddr={HOSTS[n]} CPUs=16 RealMemory=16000 State=UNKNOWN"
                      for n in COMPUTE_HOSTS)
    return f"""{MARKER}
# Slurm 22.05 for the bed: controller runs slurmctld, compute1/compute2 run slurmd (nsenter'ed).
ClusterName=hpcbed
SlurmctldHost=controller({c})
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={sd / 'jobcomp.txt'}
MailProg=/bin/true
PropagateResourceLimits=NONE
# 1, not 2: with 2 slurmctld puts a node that an admin set DOWN back in service at its next ping
# (seconds later), which would undo the node-loss simulation `scontrol update ... State=DOWN`.
ReturnToService=1
# Node loss ends the job (NODE_FAIL) instead of silently requeueing it; sbatch --requeue opts in.
JobRequeue=0
KillWait=2
MinJobAge=10
InactiveLimit=0
Waittime=0
SlurmdTimeout=30
SlurmctldTimeout=30
SlurmdParameters=config_overrides
StateSaveLocation={sd / 'ctld'}
SlurmdSpoolDir={sd / 'spool' / '%n'}
SlurmctldPidFile={sd / 'slurmctld.pid'}
SlurmdPidFile={sd / 'slurmd-%n.pid'}
SlurmctldLogFile={sd / 'slurmctld.log'}
SlurmdLogFile={sd / 'slurmd-%n.log'}
SlurmctldDebug=info
SlurmdDebug=info
{nodes}
PartitionName=debug Nodes={','.join(COMPUTE_HOSTS)} Default=YES MaxTime=INFINITE State=UP
PartitionName=small Nodes=compute2 MaxCPUsPerNode=2 MaxTime=INFINITE State=UP
"""
