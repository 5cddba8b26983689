"""Runs last (conftest orders test_zz_* after everything): repair, down, nothing left, up again."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from bedlib import ETC_HOSTS, HOSTS, MARKER, SLURM_CONF, USERS, Bed

pytestmark = pytest.mark.bed_last

BED_SCRIPT = Path(__file__).resolve().parents[1] / "bed" / "bed"
DAEMONS = {"sshd", "slurmctld", "slurmd", "slurmstepd", "munged"}


def _procs() -> list[tuple[int, int, str, str]]:
    """(pid, uid, comm, cmdline) of every live process."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append((int(entry), uid, comm, cmd))
    return out


def test_up_repairs_a_half_up_bed(bed: Bed) -> None:
    ctld = int((bed.slurm_dir / "slurmctld.pid").read_text())
    sshd = int((bed.host_dir("compute1") / "sshd.pid").read_text())
    os.kill(ctld, signal.SIGKILL)
    os.kill(sshd, signal.SIGKILL)
    time.sleep(0.3)
    assert not bed.health(logins=False).ok
    bed.up()
    ok, report = bed.status()
    assert ok, report
    assert int((bed.slurm_dir / "slurmctld.pid").read_text()) != ctld
    assert int((bed.host_dir("compute1") / "sshd.pid").read_text()) != sshd


def test_down_leaves_nothing_behind_and_up_comes_back(bed: Bed) -> None:
    # things down must clean up: a running job, a user process, an ansible ssh master
    work = bed.user_tmpdir("cluser")
    job = bed.run("controller", ["sbatch", "--parsable", "-D", str(work), "-o", "/dev/null", "--wrap", "sleep 300"],
                  user="cluser", check=True).stdout.strip()
    assert job.isdigit()
    stray = bed.popen("workspace", ["sleep", "300"], user="wsuser")
    cp = subprocess.run([str(BED_SCRIPT), "down"], capture_output=True, text=True, timeout=120, check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    stray.wait(10)

    assert bed.leftovers() == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert "hpcbed" not in netns
    mounts = Path("/proc/self/mountinfo").read_text()
    assert "hpcbed" not in mounts and str(bed.root) not in mounts
    uids = {os.stat(Path("/home") / u).st_uid for u in USERS if (Path("/home") / u).exists()}
    left = [p for p in _procs() if p[1] in uids or p[2] in DAEMONS and re.search(r"hpcbed|slurm|munge", p[3])]
    assert left == []
    assert "hpcbed" not in ETC_HOSTS.read_text()
    assert not SLURM_CONF.exists() or MARKER not in SLURM_CONF.read_text()
    assert not bed.root.exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "hpcbed" not in links and "v-workspace" not in links

    # down is idempotent
    cp = subprocess.run([str(BED_SCRIPT), "down"], capture_output=True, text=True, timeout=120, check=False)
    assert cp.returncode == 0, cp.stderr

    # status says not healthy while down
    cp = subprocess.run([str(BED_SCRIPT), "status"], capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode != 0

    # and up comes back within the budget, healthy, ready for any test after this one
    t0 = time.monotonic()
    cp = subprocess.run([str(BED_SCRIPT), "up"], capture_output=True, text=True, timeout=120, check=False)
    took = time.monotonic() - t0
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert took <= 60, took
    print(f"bed boot after down: {bed.boot_seconds():.2f} s (command {took:.2f} s)")
    bed.ensure_ready()
    ok, report = bed.status()
    assert ok, report
    for host in HOSTS:
        assert bed.run(host, ["hostname"], check=True).stdout.strip() == host
