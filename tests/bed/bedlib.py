"""The hpc.interactive test bed: four "hosts" made of network + UTS namespaces on one machine.

Standard library only; run as root. ``tests/bed/bed`` is the command-line face of this module and
``tests/integration/conftest.py`` hands a :class:`Bed` to the tests.

Layout (``HPCBED_ROOT``, default ``/var/tmp/hpcbed``; removed by ``down``)::

    bed.json            what was booted and how long it took
    inventory.ini       the Ansible inventory (also printed by ``bed inventory``)
    uts/<host>          UTS namespace files (nsfs bind mounts) -> ``hostname`` says <host>
    hosts/<host>/       sshd config, host key, pid and log of that host
    slurm/              slurmctld state, slurmd spool dirs (%n), pids, logs, jobcomp.txt
    sge/                SGE_ROOT of the Son of Grid Engine cluster (cell ``default``: common/, spool/),
                        bin|utilbin|lib/lx-amd64 -> the unpacked binaries, hpcbed/ (qconf input), tmp/ (jobs)
    collections/        the installed copy of the collection (``install_collection``)
    callback_plugins/   the ``bed_json`` stdout callback used by ``playbook_json``
    tmp/                per-user scratch dirs made by ``user_tmpdir``

Outside the root: network namespaces ``hpcbed-<host>`` and ``hpcbed-net`` (the bridge), a marked
block in /etc/hosts, /etc/slurm/slurm.conf (a pre-existing one is kept as
``slurm.conf.hpcbed-backup`` and restored by ``down``), one munged on the default socket, the port
reservation directory /tmp/isession-ports made root:root 1777 as a site's install does (kept by ``down``), and the
users wsuser, wsuser2 (a second workspace user: the other user of the shared-host tests), cluser, cluser2 (kept by
``down``: their homes hold their keys) and the system user sgeadmin. ``install`` also fills
/opt/hpc-interactive/sge (the unpacked gridengine .debs) and /opt/hpc-interactive/sge-debs (the .debs); both stay.

Son of Grid Engine 8.1.9 runs beside Slurm: sge_qmaster on the controller, sge_execd on compute1 and
compute2 (queue ``all.q``). Its binaries come from Debian's gridengine .debs, unpacked by ``install``
into ``/opt/hpc-interactive/sge`` and never installed with dpkg: gridengine-client conflicts with
slurm-wlm-torque (both ship /usr/bin/qsub), which the bed needs. sge_qmaster and the spool tools
dlopen() a hard-coded /usr/lib/gridengine/libspoolc.so, so they run in a private mount namespace
with a read-only overlay that adds the unpacked /usr/lib/gridengine (nothing outside sees it). SGE is
not on any system PATH: use ``Bed.sge`` or source ``$SGE_ROOT/default/common/settings.sh``.

The code is split by component under ``hpcbed/`` (core, install, network, sshd, slurm, sge, playbooks;
see ``hpcbed/__init__.py``); each is a mixin of :class:`Bed`, and this module keeps what spans them all:
``up``, ``down``, ``health`` and ``status``. Import everything from here.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from hpcbed.core import (CLUSTER_USERS, COMPUTE_HOSTS, HOSTS, MARKER, PREFIX, USERS, WS_USER, WS_USER2, BOOT_TIMEOUT,
                         BedBase, BedError, CommandFailed, Health, _ancestors, _comm, _is_mountpoint, _log, _ns_inode,
                         _pid_alive, _proc_ns_inodes, _proc_start, _read_pid, _require_root, _sh, _user_exists,
                         _write_in_place, default_root)
from hpcbed.install import InstallMixin
from hpcbed.network import ETC_HOSTS, HOSTS_BEGIN, NET_NS, NETNS_DIR, NetworkMixin, _strip_block
from hpcbed.playbooks import AnsibleMixin, PlaybookResult
from hpcbed.sge import SGE_QMASTER_HOST, SgeMixin
from hpcbed.slurm import MUNGE_PID, SLURM_BACKUP, SLURM_CONF, STALE_DOWN_SECONDS, SlurmMixin, _munge_ok, _slurm_conf
from hpcbed.sshd import SshdMixin


class Bed(InstallMixin, NetworkMixin, SshdMixin, SlurmMixin, SgeMixin, AnsibleMixin, BedBase):
    """The test bed: its components (``hpcbed/``) and what spans them. Every method that changes the machine
    needs root."""

    def up(self) -> float:
        """Boot the bed (install first if needed). Healthy already -> quick no-op. Returns seconds taken."""
        _require_root()
        t0 = time.monotonic()
        with self.locked():
            if self.missing_packages() or not (self.venv / "bin" / "python").exists() or not self.sge_installed():
                self.install()
            health = self.health(logins=True) if self.root.joinpath("bed.json").exists() else None
            if health is not None and not health.ok:  # a busy machine can fail one probe: look twice
                _log("health check failed, checking again in 2 s:\n" + health.report())
                time.sleep(2)
                health = self.health(logins=True)
            if health is not None and health.ok:
                self._provision_ports_dir()
                if SLURM_CONF.read_text() != _slurm_conf(self.slurm_dir):  # the bed's config changed: apply it
                    self._write_slurm_conf()
                    self.slurm(["scontrol", "reconfigure"])
                for node in COMPUTE_HOSTS:
                    if self.node_down_for(node) > STALE_DOWN_SECONDS:
                        self.node_resume(node)
                took = time.monotonic() - t0
                _log(f"already up and healthy ({took:.2f} s; booted in {self.boot_seconds():.2f} s)")
                return took
            if health is not None or self._anything_left():
                _log("bed is half up: tearing it down first")
                self._teardown()
            t0 = time.monotonic()
            self._boot()
            took = time.monotonic() - t0
            self._write_state({"boot_seconds": round(took, 3), "booted_at": time.time()})
            _log(f"up in {took:.2f} s")
            return took

    def down(self) -> None:
        """Stop everything the bed started and remove its namespaces, mounts and files (users stay)."""
        _require_root()
        with self.locked():
            self._teardown()

    def _boot(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        self._make_dirs()
        self._provision_ports_dir()
        self._ensure_users()
        self._make_network()
        self._make_uts()
        self._write_etc_hosts()
        self._start_sge_qmaster()  # it boots (~0.5 s) while sshd and Slurm start
        self._ssh_setup()
        for host in HOSTS:
            self._start_sshd(host)
        self._start_munge()
        self._write_slurm_conf()
        self._start_slurmctld(deadline)
        for node in COMPUTE_HOSTS:
            self._start_slurmd(node)
        self._start_sge_execds(deadline)
        self._write_inventory()
        self._install_callback()
        self._wait_healthy(deadline)

    def _wait_healthy(self, deadline: float) -> None:
        # everything but SGE first, and the logins, while the execds start (each sleeps 2 s after it
        # registered, before its first load report); then SGE
        self._wait_health(deadline, sge=False)
        logins = self.health(logins=True, sge=False)
        if not logins.ok:
            raise BedError("bed daemons up but logins fail:\n" + logins.report())
        self._wait_health(deadline, sge=True)

    def _wait_health(self, deadline: float, sge: bool) -> None:
        while True:
            last = self.health(logins=False, sge=sge)
            if last.ok:
                return
            if time.monotonic() > deadline:
                raise BedError("bed not healthy in time:\n" + last.report())
            time.sleep(0.2)

    def health(self, logins: bool = True, sge: bool = True) -> Health:
        """Check every part; ``logins`` adds real ssh logins between the bed's users; ``sge=False`` skips SGE."""
        h = Health()
        h.add("bed", "root", self.root.exists(), str(self.root))
        h.add("bed", "munge", _munge_ok(), "munge -n | unmunge")
        h.add("bed", "slurm.conf", SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text(), str(SLURM_CONF))
        h.add("bed", "network", (NETNS_DIR / NET_NS).exists(), NET_NS)
        missing = [u for u in USERS if not _user_exists(u)]
        h.add("bed", "users", not missing, f"missing: {' '.join(missing)}" if missing else " ".join(USERS))
        for host in HOSTS:
            ns_ok = self.netns_path(host).exists()
            h.add(host, "netns", ns_ok, self.ns_name(host))
            uts_ok = _is_mountpoint(self.uts_path(host))
            h.add(host, "uts", uts_ok, str(self.uts_path(host)))
            if not (ns_ok and uts_ok):
                continue
            name = _sh(["nsenter", f"--uts={self.uts_path(host)}", "hostname"], check=False).stdout.strip()
            h.add(host, "hostname", name == host, name)
            pid = _read_pid(self.host_dir(host) / "sshd.pid")
            listening = self._listening(host, 22)
            h.add(host, "sshd", bool(pid and _pid_alive(pid) and listening), f"pid {pid}, :22 listening={listening}")
        if h.part_ok("controller"):
            self._slurm_health(h)
        if sge and h.part_ok(SGE_QMASTER_HOST, ignore=("slurmctld",)):
            self._sge_health(h)
        if logins and h.ok:
            checks = [("workspace", WS_USER, c, h_) for h_ in ("controller", *COMPUTE_HOSTS) for c in CLUSTER_USERS[:1]]
            checks.append(("compute1", CLUSTER_USERS[0], WS_USER, "workspace"))
            procs = [(src, user, dest_user, dest, self.popen(
                src, ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", f"{dest_user}@{dest}", "hostname"],
                user=user, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True))
                for src, user, dest_user, dest in checks]
            for src, user, dest_user, dest, p in procs:
                try:
                    out, err = p.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    out, err = p.communicate()
                h.add(dest, "login", out.strip() == dest,
                      f"{user}@{src} -> {dest_user}@{dest}: {(out.strip() or err.strip())[:200]}")
        return h

    def status(self) -> Tuple[bool, str]:
        h = self.health(logins=True)
        head = f"hpcbed root={self.root} boot_seconds={self.boot_seconds():.2f}"
        return h.ok, head + "\n" + h.report() + ("\nhealthy" if h.ok else "\nNOT HEALTHY")

    def bed_pids(self) -> List[int]:
        """Processes that belong to the bed: in its namespaces, owned by its users, or its munged."""
        net_inodes = {i for i in (_ns_inode(p) for p in NETNS_DIR.glob(f"{PREFIX}-*")) if i}
        uts_inodes = {i for i in (_ns_inode(p) for p in (self.root / "uts").glob("*") if _is_mountpoint(p)) if i}
        uids = set()
        for user in USERS:
            with contextlib.suppress(KeyError):
                uids.add(pwd.getpwnam(user).pw_uid)
        spare = {os.getpid(), *_ancestors(os.getpid())}
        munged = _read_pid(MUNGE_PID)
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in spare:
                continue
            pid = int(entry)
            try:
                if pid == munged or os.stat(f"/proc/{pid}").st_uid in uids \
                        or _proc_ns_inodes(pid, "net") & net_inodes \
                        or _proc_ns_inodes(pid, "uts") & uts_inodes:
                    pids.append(pid)
            except OSError:
                continue
        return pids

    def _kill_all(self) -> List[int]:
        """SIGTERM every bed process, SIGKILL after 2 s; wait until each has really exited.

        A process that is exiting loses /proc/PID/ns/* before it is gone (and a multi-threaded one, like
        sge_qmaster, can be a zombie leader while its threads still run), so every pid seen once is
        remembered (with its start time, against pid reuse) until it is gone or a zombie with no live thread.
        """
        seen: Dict[int, Optional[str]] = {}
        net_inodes = {i for i in (_ns_inode(p) for p in NETNS_DIR.glob(f"{PREFIX}-*")) if i}
        for pid in self._sge_daemon_pids().values():  # the spool is removed anyway: no clean shutdown (~7 s)
            if _proc_ns_inodes(pid, "net") & net_inodes:
                seen[pid] = _proc_start(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

        def alive() -> List[int]:
            for pid in self.bed_pids():
                if pid not in seen:
                    seen[pid] = _proc_start(pid)
            for pid, start in list(seen.items()):
                if not _pid_alive(pid) or _proc_start(pid) != start:
                    del seen[pid]
            return sorted(seen)

        for sig, rounds in ((signal.SIGTERM, 20), (signal.SIGKILL, 30)):
            for _attempt in range(rounds):
                pids = alive()
                if not pids:
                    return []
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                time.sleep(0.1)
        return alive()

    def _anything_left(self) -> bool:
        return bool(self.leftovers())

    def leftovers(self) -> List[str]:
        """What a ``down`` would have to remove (empty when the machine is clean)."""
        left = [f"netns {p.name}" for p in NETNS_DIR.glob(f"{PREFIX}-*")] if NETNS_DIR.exists() else []
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            left += [f"mount {line.split()[4]}" for line in fh
                     if line.split()[4].startswith(str(self.root) + "/") or f"/{PREFIX}-" in line.split()[4]]
        left += [f"process {p} ({_comm(p)})" for p in self.bed_pids() if _pid_alive(p)]
        if HOSTS_BEGIN in ETC_HOSTS.read_text():
            left.append("/etc/hosts block")
        if SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text():
            left.append(str(SLURM_CONF))
        if self.root.exists():
            left.append(f"dir {self.root}")
        return left

    def _teardown(self) -> None:
        survivors = self._kill_all()
        for p in sorted((self.root / "uts").glob("*")) if (self.root / "uts").exists() else []:
            while _is_mountpoint(p):
                if _sh(["umount", str(p)], check=False).returncode != 0:
                    _sh(["umount", "-l", str(p)], check=False)
                    break
        for p in sorted(NETNS_DIR.glob(f"{PREFIX}-*")) if NETNS_DIR.exists() else []:
            _sh(["ip", "netns", "delete", p.name], check=False)
        if NETNS_DIR.exists() and not any(NETNS_DIR.iterdir()):
            while _is_mountpoint(NETNS_DIR):
                if _sh(["umount", str(NETNS_DIR)], check=False).returncode != 0:
                    break
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()
        if ETC_HOSTS.exists() and HOSTS_BEGIN in ETC_HOSTS.read_text():
            _write_in_place(ETC_HOSTS, _strip_block(ETC_HOSTS.read_text()))
        if SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text():
            SLURM_CONF.unlink()
        if SLURM_BACKUP.exists() and not SLURM_CONF.exists():
            shutil.move(str(SLURM_BACKUP), str(SLURM_CONF))
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        if survivors:
            raise BedError(f"processes survived SIGKILL: {survivors}")
        left = self.leftovers()
        if left:
            raise BedError("down left things behind: " + ", ".join(left))


__all__ = ["Bed", "BedError", "CommandFailed", "PlaybookResult", "HOSTS", "USERS", "WS_USER", "WS_USER2",
           "CLUSTER_USERS", "COMPUTE_HOSTS", "default_root"]
