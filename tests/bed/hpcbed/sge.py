"""Son of Grid Engine: the unpacked gridengine binaries, the cell, sge_qmaster on the controller, sge_execd on
the compute hosts, queue all.q. See the module documentation of ``bedlib`` for why it is unpacked and not
installed, and why the qmaster runs under a private overlay of /usr/lib."""
from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from hpcbed.core import (BASE_PATH, COMPUTE_HOSTS, MARKER, SGE_ADMIN, BedError, Health, PathLike, _comm, _log,
                         _ns_inode, _pid_alive, _proc_ns_inodes, _read_pid, _require_root, _sh)
from hpcbed.install import _apt, _apt_candidates

SGE_PREFIX = Path(os.environ.get("HPCBED_SGE_PREFIX", "/opt/hpc-interactive/sge"))
SGE_DEB_CACHE = SGE_PREFIX.with_name(SGE_PREFIX.name + "-debs")
SGE_DEBS = ("gridengine-common", "gridengine-client", "gridengine-exec", "gridengine-master")
SGE_STAMP = ".hpcbed-sge.json"  # in SGE_PREFIX: {package: version} of what is unpacked there
SGE_CELL = "default"
SGE_ARCH = "lx-amd64"
SGE_QMASTER_HOST = "controller"
SGE_EXEC_HOSTS = COMPUTE_HOSTS
SGE_SUBMIT_HOSTS = (SGE_QMASTER_HOST, *SGE_EXEC_HOSTS)
SGE_QUEUE = "all.q"
SGE_SLOTS = 2
SGE_GID_BASE = 20000  # each execd gets its own 100 job-tracking group ids (the hosts share one /proc)
SGE_PROGRAMS = ("sge_qmaster", "sge_execd", "sge_shepherd", "qsub", "qstat", "qdel", "qacct", "qconf",
                "spoolinit", "spooldefaults.bin")
SGE_BAD_QUEUE_STATES = "uaEdo"  # unknown, alarm, Error, disabled, orphaned


class SgeMixin:
    """The SGE cell under the bed root, its daemons, its client commands and its health."""

    @property
    def sge_root(self) -> Path:
        """SGE_ROOT of the bed's Son of Grid Engine cluster (cell ``default``)."""
        return self.root / "sge"

    @property
    def sge_cell(self) -> str:
        return SGE_CELL

    @property
    def sge_bin(self) -> Path:
        """The SGE client and daemon bin dir ($SGE_ROOT/bin/lx-amd64, a link to the unpacked binaries)."""
        return self.sge_root / "bin" / SGE_ARCH

    @property
    def sge_common(self) -> Path:
        return self.sge_root / SGE_CELL / "common"

    @property
    def sge_qmaster_spool(self) -> Path:
        return self.sge_root / SGE_CELL / "spool" / "qmaster"

    @property
    def sge_execd_spool(self) -> Path:
        """execd_spool_dir; each execd spools to <this>/<host>."""
        return self.sge_root / SGE_CELL / "spool" / "execd"

    @property
    def sge_conf_dir(self) -> Path:
        """The files ``up`` feeds to spooldefaults and qconf."""
        return self.sge_root / "hpcbed"

    @property
    def sge_tmpdir(self) -> Path:
        """The queue's tmpdir (execd makes <job>.<task>.<queue>/ in it for each job)."""
        return self.sge_root / "tmp"

    @staticmethod
    def sge_binaries() -> Path:
        """Where the unpacked gridengine binaries are (binary_path; $SGE_ROOT/bin/lx-amd64 points here)."""
        return SGE_PREFIX / "usr" / "lib" / "gridengine"

    @staticmethod
    def sge_share() -> Path:
        return SGE_PREFIX / "usr" / "share" / "gridengine"

    def sge_env(self) -> Dict[str, str]:
        """SGE_ROOT, SGE_CELL and SGE_ARCH: what every SGE client and daemon needs (PATH not included)."""
        return {"SGE_ROOT": str(self.sge_root), "SGE_CELL": SGE_CELL, "SGE_ARCH": SGE_ARCH}

    def sge(self, argv: Sequence[str], user: Optional[str] = None, check: bool = True,  # noqa: PLR0917
            timeout: float = 30, cwd: Optional[PathLike] = None, host: str = SGE_QMASTER_HOST
            ) -> subprocess.CompletedProcess:
        """Run an SGE client command (qsub, qstat, qdel, qacct, qconf...) on the controller (as root by default).

        SGE_ROOT, SGE_CELL and SGE_ARCH are set and the SGE bin dir comes first on PATH, so ``qsub`` is
        SGE's and not Slurm's torque wrapper /usr/bin/qsub. ``host`` picks another submit host.
        """
        env = {**self.sge_env(), "LC_ALL": "C", "PATH": f"{self.sge_bin}:{self.user_env(user)['PATH']}"}
        return self.run(host, list(argv), user=user, env=env, check=check, timeout=timeout, cwd=cwd)

    def sge_queue_instances(self, timeout: float = 15) -> Dict[str, Tuple[str, str]]:
        """``{host: (load_avg, states)}`` of the all.q instances from ``qstat -f`` (load ``-NA-`` = no report yet)."""
        cp = self.sge(["qstat", "-f", "-q", SGE_QUEUE], check=False, timeout=timeout)
        out = {}
        for line in cp.stdout.splitlines():
            cols = line.split()
            if cols and cols[0].startswith(f"{SGE_QUEUE}@") and len(cols) >= 5:
                out[cols[0].split("@", 1)[1]] = (cols[3], cols[5] if len(cols) > 5 else "")
        return out

    def _sge_daemon_pids(self) -> Dict[str, int]:
        """``{host: pid}`` of the SGE daemons whose pid files name a live sge_* process (not checked: its netns)."""
        files = {SGE_QMASTER_HOST: self.sge_qmaster_spool / "qmaster.pid"}
        files.update({h: self.sge_execd_spool / h / "execd.pid" for h in SGE_EXEC_HOSTS})
        out = {}
        for host, path in files.items():
            pid = _read_pid(path)
            if pid and _pid_alive(pid) and _comm(pid).startswith("sge_"):
                out[host] = pid
        return out

    def sge_installed(self) -> Dict[str, str]:
        """``{package: version}`` of the gridengine .debs unpacked in SGE_PREFIX ({} when incomplete)."""
        try:
            stamp = json.loads((SGE_PREFIX / SGE_STAMP).read_text())
        except (OSError, ValueError):
            return {}
        if set(stamp) != set(SGE_DEBS) or not all(os.access(self.sge_binaries() / p, os.X_OK) for p in SGE_PROGRAMS):
            return {}
        return stamp

    def install_sge(self) -> List[str]:
        """Make the gridengine binaries available without installing the packages.

        gridengine-client conflicts with slurm-wlm-torque (apt would remove the torque wrappers the bed
        needs), so the four .debs are fetched with ``apt-get download`` into SGE_DEB_CACHE and unpacked
        with ``dpkg-deb -x`` into SGE_PREFIX; dpkg never hears of them. Idempotent: nothing happens when
        SGE_PREFIX already holds the candidate versions (or holds a complete tree and apt knows no
        candidate). Returns ``package=version`` for each .deb unpacked.
        """
        _require_root()
        have = self.sge_installed()
        want = _apt_candidates(SGE_DEBS)
        if not all(want.values()) and not have:
            _apt(["update"], timeout=600)
            want = _apt_candidates(SGE_DEBS)
        if have and (have == want or not all(want.values())):
            self._check_sge_libraries()
            return []
        if not all(want.values()):
            raise BedError(f"apt knows no candidate for {[p for p, v in want.items() if not v]}")
        SGE_DEB_CACHE.mkdir(parents=True, exist_ok=True)
        SGE_DEB_CACHE.chmod(0o755)
        debs = []
        for pkg, version in want.items():
            deb = _cached_deb(pkg, version)
            if deb is None:
                _log(f"downloading {pkg}={version} into {SGE_DEB_CACHE}")
                _apt(["download", f"{pkg}={version}"], timeout=600, cwd=SGE_DEB_CACHE)
                deb = _cached_deb(pkg, version)
                if deb is None:
                    raise BedError(f"apt-get download {pkg}={version} left no such .deb in {SGE_DEB_CACHE}")
            debs.append(deb)
        new = SGE_PREFIX.with_name(f".{SGE_PREFIX.name}.new-{os.getpid()}")
        old = SGE_PREFIX.with_name(f".{SGE_PREFIX.name}.old-{os.getpid()}")
        shutil.rmtree(new, ignore_errors=True)
        for deb in debs:
            _sh(["dpkg-deb", "-x", str(deb), str(new)], timeout=300)
        (new / SGE_STAMP).write_text(json.dumps(want, indent=2, sort_keys=True) + "\n")
        new.chmod(0o755)
        if SGE_PREFIX.exists():
            os.rename(SGE_PREFIX, old)
        os.rename(new, SGE_PREFIX)
        shutil.rmtree(old, ignore_errors=True)
        self._check_sge_libraries()
        _log(f"unpacked {' '.join(p.name for p in debs)} into {SGE_PREFIX}")
        return [f"{p}={v}" for p, v in want.items()]

    def _check_sge_libraries(self) -> None:
        missing = set()
        for prog in SGE_PROGRAMS:
            cp = _sh(["ldd", str(self.sge_binaries() / prog)], check=False)
            missing.update(line.split()[0] for line in cp.stdout.splitlines()
                           if "not found" in line and "libspool" not in line)  # libspool*: dlopen()ed, see up
        if missing:
            raise BedError(f"the gridengine binaries miss shared libraries {sorted(missing)}: add their packages "
                           "to PACKAGES in tests/bed/hpcbed/install.py")

    def _start_sge_qmaster(self) -> None:
        """Son of Grid Engine, part 1: the cell and the qmaster spool (offline), then sge_qmaster on the controller."""
        if not self.sge_installed():
            raise BedError(f"no gridengine binaries in {SGE_PREFIX}: run tests/bed/bed install")
        self._sge_make_cell()
        self._daemon(SGE_QMASTER_HOST, self._sge_overlay([str(self.sge_bin / "sge_qmaster")]), "sge_qmaster",
                     env=self.sge_env())

    def _start_sge_execds(self, deadline: float) -> None:
        """Part 2: wait for the qmaster, configure it with qconf, start sge_execd on the compute hosts.

        ``_wait_healthy`` then waits until their queue instances report load.
        """
        self._wait(lambda: self.sge(["qconf", "-sh"], check=False, timeout=10).returncode == 0,
                   max(1.0, deadline - time.monotonic()), "sge_qmaster answering qconf -sh")
        # each sge_execd parent waits ~1 s for its daemon: start them side by side, and configure meanwhile
        # (their hosts were spooled offline by _sge_make_cell)
        self._daemons([(node, [str(self.sge_bin / "sge_execd")], f"sge_execd-{node}") for node in SGE_EXEC_HOSTS],
                      env=self.sge_env(), meanwhile=self._sge_configure)

    @staticmethod
    def _sge_overlay(argv: Sequence[str]) -> List[str]:
        """argv that runs ``argv`` where /usr/lib/gridengine exists.

        sge_qmaster, spoolinit and spooldefaults dlopen() "/usr/lib/gridengine/libspoolc.so" (a path built
        into Debian's binaries; an absolute spooling_lib becomes /usr/lib/gridengine//...). They run in a
        private mount namespace with a read-only overlay of the unpacked usr/lib over /usr/lib, which no
        process outside that namespace sees; it goes away with the last process in it.
        """
        script = 'mount -t overlay hpcbed-sge-usrlib -o "lowerdir=$1:/usr/lib" /usr/lib && shift && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                str(SGE_PREFIX / "usr" / "lib"), *argv]

    def _sge_make_cell(self) -> None:
        """SGE_ROOT layout, bootstrap (classic spooling), settings.sh, and the qmaster's initial spool."""
        root, common, conf = self.sge_root, self.sge_common, self.sge_conf_dir

        def put(path: Path, text: str) -> None:  # every user's clients read bootstrap, act_qmaster, settings.*
            path.write_text(text)
            path.chmod(0o644)

        for d in (root, root / SGE_CELL, common, root / SGE_CELL / "spool", self.sge_qmaster_spool,
                  self.sge_execd_spool, conf, conf / "adminhosts", conf / "submithosts", conf / "exechosts",
                  conf / "lconf", self.sge_tmpdir,
                  root / "bin", root / "utilbin", root / "lib"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        for sub in ("bin", "utilbin", "lib"):  # where SGE looks for its tools ($SGE_ROOT/utilbin/<arch>/...)
            (root / sub / SGE_ARCH).symlink_to(self.sge_binaries())
        (root / "util").symlink_to(self.sge_share() / "util")
        put(common / "bootstrap", f"""# Version: 8.1.9 (hpcbed)
admin_user              {SGE_ADMIN}
default_domain          none
ignore_fqdn             true
spooling_method         classic
spooling_lib            libspoolc
spooling_params         {common};{self.sge_qmaster_spool}
binary_path             {self.sge_binaries()}
qmaster_spool_dir       {self.sge_qmaster_spool}
security_mode           none
job_spooling            true
listener_threads        2
worker_threads          2
scheduler_threads       1
""")
        put(common / "act_qmaster", SGE_QMASTER_HOST + "\n")
        env = self.sge_env()
        put(common / "settings.sh", f"{MARKER}\n" + "".join(f"{k}={v}; export {k}\n" for k, v in env.items())
            + f"PATH={self.sge_bin}:$PATH; export PATH\n")
        put(common / "settings.csh", f"{MARKER}\n" + "".join(f"setenv {k} {v}\n" for k, v in env.items())
            + f"setenv PATH {self.sge_bin}:$PATH\n")
        # the global configuration: Debian's default with the bed's spool dir, quick load reports and
        # accounting records written at once (qacct sees a job as soon as it ended)
        glob = (self.sge_share() / "default-configuration").read_text()
        glob = _set_conf_fields(glob, {
            "execd_spool_dir": str(self.sge_execd_spool), "load_report_time": "00:00:05", "mailer": "/bin/true",
            "reporting_params": "accounting=true reporting=false flush_time=00:00:01 joblog=false "
                                "sharelog=00:00:00 accounting_flush_time=00:00:00"})
        put(conf / "global", glob)
        # hosts, offline too, so an execd can start as soon as the qmaster answers: admin hosts (an exec
        # host must be one before its execd registers), submit hosts, exec hosts, and each exec host's
        # local configuration with its own job-tracking gid_range (the hosts share one /proc)
        for host in SGE_SUBMIT_HOSTS:
            put(conf / "adminhosts" / host, f"hostname {host}\n")
            put(conf / "submithosts" / host, f"hostname {host}\n")
        for i, node in enumerate(SGE_EXEC_HOSTS):
            unset = ("load_scaling", "complex_values", "user_lists", "xuser_lists", "projects", "xprojects",
                     "usage_scaling", "report_variables")
            put(conf / "exechosts" / node, f"hostname {node}\n" + "".join(f"{k} NONE\n" for k in unset))
            lo = SGE_GID_BASE + 100 * i
            put(conf / "lconf" / node, f"mailer /bin/true\nxterm /usr/bin/xterm\ngid_range {lo}-{lo + 99}\n")
        admin = pwd.getpwnam(SGE_ADMIN)
        for top in (root / SGE_CELL, conf):
            for dirpath, _dirs, files in os.walk(top):
                os.chown(dirpath, admin.pw_uid, admin.pw_gid)
                for name in files:
                    os.chown(os.path.join(dirpath, name), admin.pw_uid, admin.pw_gid)
        resources = self.sge_share() / "util" / "resources"
        steps = [["spoolinit", "classic", "libspoolc", f"{common};{self.sge_qmaster_spool}", "init"],
                 ["spooldefaults", "configuration", str(conf / "global")],
                 ["spooldefaults", "complexes", str(resources / "centry")],
                 ["spooldefaults", "usersets", str(resources / "usersets")],
                 ["spooldefaults", "managers", "root", SGE_ADMIN],
                 ["spooldefaults", "adminhosts", str(conf / "adminhosts")],
                 ["spooldefaults", "submithosts", str(conf / "submithosts")],
                 ["spooldefaults", "exechosts", str(conf / "exechosts")],
                 *(["spooldefaults", "local_conf", str(conf / "lconf" / n), n] for n in SGE_EXEC_HOSTS)]
        # one overlay namespace and one setpriv for all steps (sh -e stops at the first failing one)
        script = "set -e\numask 022\n" + "".join(
            f"echo '>>' {shlex.quote(step[0])} {shlex.quote(step[1])}; "
            f"{shlex.join([str(self.sge_bin / step[0]), *step[1:]])}\n" for step in steps)
        cp = _sh(self._sge_overlay(["setpriv", f"--reuid={admin.pw_uid}", f"--regid={admin.pw_gid}", "--init-groups",
                                    "--", "sh", "-c", script]),
                 env={"PATH": BASE_PATH, "HOME": "/", **env}, check=False, timeout=120)
        if cp.returncode != 0:
            raise BedError(f"making the SGE spool failed ({cp.returncode}): {cp.stdout[-1500:]}{cp.stderr[-1500:]}")

    def _sge_configure(self) -> None:
        """qconf as root on the controller (a manager, on an admin host): fast scheduler, @allhosts, all.q."""
        conf = self.sge_conf_dir

        def write(name: str, text: str) -> str:
            path = conf / name
            path.write_text(text)
            path.chmod(0o644)
            return str(path)

        # scheduler: a run every second and right after each submit and job end (the default, 15 s, is slow)
        sconf = _set_conf_fields(self.sge(["qconf", "-ssconf"]).stdout, {
            "schedule_interval": "0:0:1", "flush_submit_sec": "1", "flush_finish_sec": "1"})
        self.sge(["qconf", "-Msconf", write("sconf", sconf)])
        self.sge(["qconf", "-Ahgrp", write("allhosts", f"group_name @allhosts\nhostlist {' '.join(SGE_EXEC_HOSTS)}\n")])
        self.sge(["qconf", "-Aq", write(SGE_QUEUE, _sge_queue_conf(self.sge_tmpdir))])

    def _sge_health(self, h: Health) -> None:
        """sge_qmaster alive in the controller's netns and answering; each execd alive in its host's netns
        with its all.q instance reporting load and in no u/a/E/d/o state. (Liveness matters: qmaster
        keeps a dead execd's queue looking fine until max_unheard, 5 min.)"""
        pids = self._sge_daemon_pids()

        def in_netns(host: str) -> bool:
            pid = pids.get(host)
            return bool(pid) and _proc_ns_inodes(pid, "net") == {_ns_inode(self.netns_path(host))}

        admin_hosts: List[str] = []
        if in_netns(SGE_QMASTER_HOST):
            cp = self.sge(["qconf", "-sh"], check=False, timeout=10)
            admin_hosts = cp.stdout.split() if cp.returncode == 0 else []
        qmaster_ok = SGE_QMASTER_HOST in admin_hosts
        h.add(SGE_QMASTER_HOST, "sge_qmaster", qmaster_ok,
              f"pid {pids.get(SGE_QMASTER_HOST)}, qconf -sh: {' '.join(admin_hosts) or 'no answer'}")
        instances = self.sge_queue_instances() if qmaster_ok else {}
        for node in SGE_EXEC_HOSTS:
            if not h.part_ok(node, ignore=("slurmd",)):
                continue
            load, states = instances.get(node, ("?", ""))
            ok = in_netns(node) and load not in ("?", "-NA-") and not set(states) & set(SGE_BAD_QUEUE_STATES)
            h.add(node, "sge_execd", ok, f"pid {pids.get(node)}, {SGE_QUEUE}@{node} load={load} states={states or '-'}")


def _cached_deb(package: str, version: str) -> Optional[Path]:
    for deb in sorted(SGE_DEB_CACHE.glob(f"{package}_*.deb")):
        cp = _sh(["dpkg-deb", "-f", str(deb), "Package", "Version"], check=False)
        fields = dict(line.split(": ", 1) for line in cp.stdout.splitlines() if ": " in line)
        if fields.get("Package") == package and fields.get("Version") == version:
            return deb
    return None


def _set_conf_fields(text: str, fields: Mapping[str, str]) -> str:
    """Set ``name value`` lines of an SGE configuration text (each name must be there)."""
    for name, value in fields.items():
        text, n = re.subn(rf"(?m)^{re.escape(name)}[ \t]+.*$", f"{name:<32} {value}", text)
        if n != 1:
            raise BedError(f"SGE configuration has {n} lines for {name!r}")
    return text


def _sge_queue_conf(tmpdir: Path) -> str:
    """all.q on @allhosts: no load thresholds (a busy 2-core machine would put it in alarm state and
    jobs would wait), ``#!`` honoured (unix_behavior), job tmp dirs under the bed root."""
    fields = {
        "qname": SGE_QUEUE, "hostlist": "@allhosts", "seq_no": "0", "load_thresholds": "NONE",
        "suspend_thresholds": "NONE", "nsuspend": "1", "suspend_interval": "00:05:00", "priority": "0",
        "min_cpu_interval": "00:05:00", "processors": "UNDEFINED", "qtype": "BATCH INTERACTIVE",
        "ckpt_list": "NONE", "pe_list": "NONE", "rerun": "FALSE", "slots": str(SGE_SLOTS), "tmpdir": str(tmpdir),
        "shell": "/bin/bash", "prolog": "NONE", "epilog": "NONE", "shell_start_mode": "unix_behavior",
        "starter_method": "NONE", "suspend_method": "NONE", "resume_method": "NONE", "terminate_method": "NONE",
        "notify": "00:00:60", "owner_list": "NONE", "user_lists": "NONE", "xuser_lists": "NONE",
        "subordinate_list": "NONE", "complex_values": "NONE", "projects": "NONE", "xprojects": "NONE",
        "calendar": "NONE", "initial_state": "default",
    }
    for limit in ("rt", "cpu", "fsize", "data", "stack", "core", "rss", "vmem"):
        fields[f"s_{limit}"] = fields[f"h_{limit}"] = "INFINITY"
    return "".join(f"{k:<21} {v}\n" for k, v in fields.items())
