"""The test bed itself: hosts, users, keys, Slurm, PBS wrappers, SGE and Ansible, as the API promises."""
from __future__ import annotations

import os
import pwd
import re
import stat
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET  # noqa: S405 - output of the bed's own qstat
from pathlib import Path

import pytest
from bedlib import CLUSTER_USERS, COMPUTE_HOSTS, HOSTS, USERS, WS_USER, Bed

BED_SCRIPT = Path(__file__).resolve().parents[1] / "bed" / "bed"


def _wait(pred, timeout: float = 30, step: float = 0.2):
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met in {timeout} s")
        time.sleep(step)


def _job_field(bed: Bed, job_id: str, field: str) -> str:
    out = bed.run("controller", ["scontrol", "show", "job", "-o", job_id], user="cluser", env={"LC_ALL": "C"}).stdout
    m = re.search(rf"\b{field}=(\S*)", out)
    return m.group(1) if m else ""


def _sge_jobs(bed: Bed, user: str = "cluser") -> dict:
    """``{job id: (state, queue_name)}`` of ``user``'s running and pending jobs, from ``qstat -xml``."""
    root = ET.fromstring(bed.sge(["qstat", "-xml"], user=user).stdout)  # noqa: S314
    return {j.findtext("JB_job_number"): (j.findtext("state"), j.findtext("queue_name") or "")
            for j in root.iter("job_list")}


def _qacct(bed: Bed, job: str, user: str) -> dict:
    """``qacct -j JOB`` as ``user`` as a dict (empty while the job has no accounting record)."""
    cp = bed.sge(["qacct", "-j", job], user=user, check=False)
    if cp.returncode != 0:
        return {}
    pairs = (line.split(None, 1) + [""] for line in cp.stdout.splitlines() if line.strip() and line[0] != "=")
    return {p[0]: p[1].strip() for p in pairs}


def _start_time(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _sbatch(bed: Bed, workdir: Path, *args: str) -> str:
    cp = bed.run("controller", ["sbatch", "--parsable", "-D", str(workdir), *args], user="cluser", check=True,
                 env={"LC_ALL": "C"})
    return cp.stdout.strip().split(";")[0]


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_each_host_has_its_own_hostname_and_address(bed: Bed, host: str) -> None:
    assert bed.run(host, ["hostname"], check=True).stdout.strip() == host
    assert bed.run(host, ["hostname"], user=CLUSTER_USERS[0], check=True).stdout.strip() == host
    addrs = bed.run(host, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], check=True).stdout
    assert f"inet {bed.ip(host)}/24" in addrs


def test_root_namespace_holds_no_bed_address_or_bridge(bed: Bed) -> None:
    assert bed.netns_path("workspace").exists()
    addrs = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "10.199.77." not in addrs
    assert "br-hpcbed" not in links and "v-compute1" not in links


def test_users_are_separate_accounts_with_private_homes(bed: Bed) -> None:
    uids = set()
    for user in USERS:
        pw = pwd.getpwnam(user)
        uids.add(pw.pw_uid)
        st = os.stat(pw.pw_dir)
        assert stat.S_IMODE(st.st_mode) == 0o700, user
        assert st.st_uid == pw.pw_uid
        assert pw.pw_shell == "/bin/bash"
    assert len(uids) == len(USERS)
    denied = bed.run("controller", ["ls", pwd.getpwnam(WS_USER).pw_dir], user="cluser")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


@pytest.mark.parametrize("dest_user", CLUSTER_USERS)
@pytest.mark.parametrize("dest", ["controller", *COMPUTE_HOSTS])
def test_wsuser_key_logs_in_to_cluster_hosts(bed: Bed, dest: str, dest_user: str) -> None:
    cp = bed.run("workspace", ["ssh", "-o", "BatchMode=yes", f"{dest_user}@{dest}", "hostname; id -un"], user=WS_USER)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == [dest, dest_user]


@pytest.mark.parametrize("src_user", CLUSTER_USERS)
def test_cluster_user_on_compute_logs_in_to_workspace(bed: Bed, src_user: str) -> None:
    cp = bed.run("compute1", ["ssh", "-o", "BatchMode=yes", f"{WS_USER}@workspace", "hostname; id -un"],
                 user=src_user)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["workspace", WS_USER]
    # and by address, since known_hosts holds both names and IPs
    cp = bed.run("compute2", ["ssh", "-o", "BatchMode=yes", f"{WS_USER}@{bed.ip('workspace')}", "hostname"],
                 user=src_user)
    assert cp.stdout.strip() == "workspace", cp.stderr


def test_no_password_and_no_root_login(bed: Bed) -> None:
    cp = bed.run("workspace", ["ssh", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", "/dev/null",
                               "cluser@controller", "true"], user=WS_USER)
    assert cp.returncode == 255 and "Permission denied" in cp.stderr
    cp = bed.run("workspace", ["ssh", "-o", "BatchMode=yes", "root@controller", "true"], user=WS_USER)
    assert cp.returncode == 255


def test_compute_reaches_workspace_and_controller_directly(bed: Bed) -> None:
    probe = ("import socket,sys\n"
             "for h in sys.argv[1:]: socket.create_connection((h, 22), 3).close(); print(h)")
    cp = bed.run("compute2", ["/usr/bin/python3", "-c", probe, "workspace", "controller", "compute1"],
                 user="cluser", check=True)
    assert cp.stdout.split() == ["workspace", "controller", "compute1"]


def test_tunnel_style_forward_from_compute_to_workspace(bed: Bed) -> None:
    """ssh -R from compute1 opens 127.0.0.1:PORT on the workspace only (GatewayPorts no)."""
    fwd = bed.popen("compute1", ["ssh", "-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                                 "-R", "127.0.0.1:0:127.0.0.1:22", f"{WS_USER}@workspace"],
                    user="cluser", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = _wait(fwd.stderr.readline, timeout=15)
        port = int(re.search(r"Allocated port (\d+)", line).group(1))
        listeners = bed.run("workspace", ["ss", "-Hltn", f"sport = :{port}"], check=True).stdout
        assert f"127.0.0.1:{port}" in listeners
        banner = bed.run("workspace", ["/usr/bin/python3", "-c",
                                       f"import socket; s=socket.create_connection(('127.0.0.1',{port}),3);"
                                       "print(s.recv(64).decode())"], user=WS_USER, check=True).stdout
        assert banner.startswith("SSH-2.0-")
    finally:
        os.killpg(fwd.pid, 15)
        fwd.wait(10)


@pytest.mark.parametrize("node", COMPUTE_HOSTS)
def test_slurm_job_runs_on_compute_host_and_scancel_stops_it(bed: Bed, node: str) -> None:
    work = bed.user_tmpdir("cluser")
    name = f"bedtest-{uuid.uuid4().hex[:8]}"
    job = _sbatch(bed, work, "-J", name, "-w", node, "-o", f"{work}/out.%j", "--wrap", "hostname; sleep 60")
    _wait(lambda: _job_field(bed, job, "JobState") == "RUNNING")
    assert _job_field(bed, job, "NodeList") == node
    out = Path(f"{work}/out.{job}")
    assert _wait(lambda: out.exists() and out.read_text().strip()) == node
    bed.run("controller", ["scancel", job], user="cluser", check=True)
    _wait(lambda: _job_field(bed, job, "JobState") in ("CANCELLED", ""))
    # the job's processes are gone from the compute host
    _wait(lambda: "sleep 60" not in bed.run(node, ["ps", "-u", "cluser", "-o", "args="]).stdout, timeout=15)


def test_slurm_default_partition_and_final_state_recorded(bed: Bed) -> None:
    work = bed.user_tmpdir("cluser")
    job = _sbatch(bed, work, "-o", f"{work}/out.%j", "--wrap", "hostname")
    _wait(lambda: Path(f"{work}/out.{job}").exists() and Path(f"{work}/out.{job}").read_text().strip())
    assert Path(f"{work}/out.{job}").read_text().strip() in COMPUTE_HOSTS
    assert _job_field(bed, job, "Partition") in ("debug", "")
    jobcomp = bed.slurm_dir / "jobcomp.txt"
    _wait(lambda: jobcomp.exists() and f"JobId={job} " in jobcomp.read_text())
    line = next(ln for ln in jobcomp.read_text().splitlines() if f"JobId={job} " in ln)
    assert "JobState=COMPLETED" in line


def test_small_partition_can_be_filled(bed: Bed) -> None:
    work = bed.user_tmpdir("cluser")
    jobs = [_sbatch(bed, work, "-p", "small", "-c", "1", "-o", "/dev/null", "--wrap", "sleep 60")
            for _attempt in range(3)]
    try:
        _wait(lambda: sum(_job_field(bed, j, "JobState") == "RUNNING" for j in jobs) == 2)
        states = [_job_field(bed, j, "JobState") for j in jobs]
        assert states.count("PENDING") == 1
        running = [j for j, s in zip(jobs, states, strict=True) if s == "RUNNING"]
        assert all(_job_field(bed, j, "NodeList") == "compute2" for j in running)
    finally:
        bed.run("controller", ["scancel", *jobs], user="cluser")


def test_pbs_qsub_qstat_qdel(bed: Bed) -> None:
    work = bed.user_tmpdir("cluser")
    script = bed.write_user_file("cluser", work / "job.sh", "#!/bin/bash\nhostname\nsleep 60\n", 0o700)
    cp = bed.run("controller", ["qsub", str(script)], user="cluser", cwd=work, check=True)
    job = cp.stdout.strip()
    assert job.isdigit(), cp.stdout
    _wait(lambda: _job_field(bed, job, "JobState") == "RUNNING")
    node = _job_field(bed, job, "NodeList")
    assert node in COMPUTE_HOSTS
    out = work / f"job.sh.o{job}"
    assert _wait(lambda: out.exists() and out.read_text().strip()) == node
    qstat = bed.run("controller", ["qstat", job], user="cluser", check=True).stdout
    assert re.search(rf"^{job}\s.*\sR\s", qstat, re.M), qstat
    bed.run("controller", ["qdel", job], user="cluser", check=True)
    _wait(lambda: _job_field(bed, job, "JobState") in ("CANCELLED", ""))


@pytest.mark.parametrize("node", COMPUTE_HOSTS)
def test_sge_job_runs_in_exec_host_and_qdel_ends_it(bed: Bed, node: str) -> None:
    work = bed.user_tmpdir("cluser")
    script = bed.write_user_file("cluser", work / "sgejob.sh",
                                 '#!/bin/bash\necho "$JOB_ID $(hostname) $$" > "ran.$JOB_ID"\nsleep 300\n', 0o700)
    name = f"bedsge-{uuid.uuid4().hex[:8]}"
    cp = bed.sge(["qsub", "-terse", "-cwd", "-N", name, "-q", f"all.q@{node}", str(script)], user="cluser", cwd=work)
    job = cp.stdout.strip()
    assert job.isdigit(), cp.stdout + cp.stderr
    try:
        assert _wait(lambda: _sge_jobs(bed).get(job, ("", ""))[0] == "r")
        assert _sge_jobs(bed)[job] == ("r", f"all.q@{node}")
        ran = work / f"ran.{job}"
        job_id, host, pid = _wait(lambda: ran.exists() and ran.read_text().split())
        assert (job_id, host) == (job, node)
        # the job shell runs in the exec host's network namespace, not only under its name
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(bed.netns_path(node)).st_ino
        started = _start_time(pid)
        denied = bed.sge(["qdel", job], user="cluser2", check=False)
        assert denied.returncode != 0 and "privileges" in denied.stdout + denied.stderr
        assert _sge_jobs(bed)[job][0] == "r"
        qdel = bed.sge(["qdel", job], user="cluser")
        assert f"registered the job {job} for deletion" in qdel.stdout
        _wait(lambda: job not in _sge_jobs(bed))
        _wait(lambda: _start_time(pid) != started, timeout=15)  # the job shell is gone
        acct = _wait(lambda: _qacct(bed, job, "cluser"))
        assert (acct["jobnumber"], acct["jobname"], acct["owner"], acct["hostname"]) == (job, name, "cluser", node)
        assert acct["failed"] != "0"  # killed by qdel, not finished
    finally:
        bed.sge(["qdel", job], user="cluser", check=False)


def test_sge_cluser2_job_runs_to_the_end_and_is_accounted(bed: Bed) -> None:
    work = bed.user_tmpdir("cluser2")
    name = f"bedsge-{uuid.uuid4().hex[:8]}"
    cp = bed.sge(["qsub", "-sync", "y", "-cwd", "-N", name, "-j", "y", "-o", "out.$JOB_ID", "-b", "y",
                  "/bin/sh", "-c", "hostname; id -un"], user="cluser2", cwd=work, timeout=120)
    m = re.search(r"^Job (\d+) exited with exit code 0\.$", cp.stdout, re.M)
    assert cp.returncode == 0 and m, cp.stdout + cp.stderr
    job = m.group(1)
    host, user = (work / f"out.{job}").read_text().split()
    assert host in COMPUTE_HOSTS and user == "cluser2"
    acct = _wait(lambda: _qacct(bed, job, "cluser2"))
    assert (acct["owner"], acct["hostname"], acct["failed"], acct["exit_status"]) == ("cluser2", host, "0", "0")
    assert job not in _sge_jobs(bed, "cluser2")


def test_pbs_qsub_stays_slurms_torque_wrapper_and_sge_is_off_path(bed: Bed) -> None:
    owner = subprocess.run(["dpkg-query", "-S", "/usr/bin/qsub"], capture_output=True, text=True, check=True).stdout
    assert owner.strip() == "slurm-wlm-torque: /usr/bin/qsub"
    for pkg in ("gridengine-client", "gridengine-master", "gridengine-exec"):
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True,
                                check=False).stdout
        assert "install ok installed" not in status, pkg
    assert "Slurm" in Path("/usr/bin/qsub").read_text()
    login = bed.run("controller", ["bash", "-lc", "command -v qsub qstat qdel; echo ${SGE_ROOT:-none}"],
                    user="cluser", check=True)
    assert login.stdout.split() == ["/usr/bin/qsub", "/usr/bin/qstat", "/usr/bin/qdel", "none"]
    if Path("/etc/environment").exists():
        assert "sge" not in Path("/etc/environment").read_text().lower()
    # SGE's own commands: through Bed.sge, or after sourcing the cell's settings.sh
    assert bed.sge(["bash", "-c", "command -v qsub"], user="cluser").stdout.strip() == str(bed.sge_bin / "qsub")
    assert os.path.realpath(bed.sge_bin / "qsub").startswith("/opt/hpc-interactive/sge/")
    settings = bed.sge_root / bed.sge_cell / "common" / "settings.sh"
    cp = bed.run("controller", ["bash", "-c", f". {settings} && command -v qsub && echo $SGE_ROOT $SGE_CELL && "
                                "qstat -u cluser >/dev/null && echo qstat-ok"], user="cluser", check=True)
    assert cp.stdout.split() == [str(bed.sge_bin / "qsub"), str(bed.sge_root), "default", "qstat-ok"]


def test_node_down_and_resume(bed: Bed) -> None:
    bed.node_down("compute1", "bed test")
    try:
        assert "DOWN" in bed.node_flags("compute1")
        assert 0 < bed.node_down_for("compute1") < 120
        bed.up()  # a fresh DOWN (maybe a test in progress) is left alone by up
        assert "DOWN" in bed.node_flags("compute1")
        work = bed.user_tmpdir("cluser")
        job = _sbatch(bed, work, "-o", f"{work}/out.%j", "--wrap", "hostname")
        _wait(lambda: Path(f"{work}/out.{job}").exists() and Path(f"{work}/out.{job}").read_text().strip())
        assert Path(f"{work}/out.{job}").read_text().strip() == "compute2"
    finally:
        bed.node_resume("compute1")
    assert bed.node_state("compute1") in ("idle", "mixed", "allocated")


def test_ansible_playbook_reaches_controller_as_cluser(bed: Bed) -> None:
    play = bed.write_user_file(WS_USER, bed.user_tmpdir(WS_USER) / "play.yml", """\
- hosts: cluster
  gather_facts: false
  tasks:
    - name: who and where
      ansible.builtin.command: {argv: [sh, -c, 'hostname; id -un; echo "$BED_MSG"']}
      environment: {BED_MSG: "{{ bed_msg }}"}
      changed_when: false
""")
    cp = bed.ansible_playbook(play, extra_vars={"bed_msg": "hello from -e"})
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "controller" in cp.stdout
    res = bed.playbook_json(play, extra_vars={"bed_msg": "hi"})
    assert res.rc == 0, res.stdout + res.stderr
    assert res.task("who and where", "controller")["stdout_lines"] == ["controller", "cluser", "hi"]
    assert res["stats"]["controller"]["failures"] == 0


def test_ansible_module_helper_and_installed_collection(bed: Bed) -> None:
    res = bed.ansible_module("ansible.builtin.command", {"argv": ["hostname"]})
    assert res["rc"] == 0 and res["stdout"] == "workspace", res
    res = bed.ansible_module("ansible.builtin.command", {"argv": ["id", "-un"]}, target="controller")
    assert res["stdout"] == "cluser", res
    # strings reach the module verbatim (marked unsafe: no templating)
    res = bed.ansible_module("ansible.builtin.debug", {"msg": "{{ not_templated }} $(x) `y`"})
    assert res["msg"] == "{{ not_templated }} $(x) `y`", res
    cp = bed.run("workspace", ["ansible-galaxy", "collection", "list", "hpc.interactive"], user=WS_USER,
                 env=bed.ansible_env(), check=True)
    assert str(bed.collections_path) in cp.stdout and "hpc.interactive" in cp.stdout


def test_status_and_idempotent_up(bed: Bed) -> None:
    pid_files = [bed.host_dir(h) / "sshd.pid" for h in HOSTS] + [bed.sge_root / "default/spool/qmaster/qmaster.pid"]
    pid_files += [bed.sge_root / f"default/spool/execd/{n}/execd.pid" for n in COMPUTE_HOSTS]
    pids = [p.read_text() for p in pid_files]
    t0 = time.monotonic()
    bed.up()
    assert time.monotonic() - t0 < 10
    assert [p.read_text() for p in pid_files] == pids
    cp = subprocess.run([str(BED_SCRIPT), "status"], capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "healthy" in cp.stdout and "boot_seconds=" in cp.stdout
    assert "sge_qmaster=ok" in cp.stdout
    assert all(f"sge_execd=ok (pid {int(pids[-2 + i])}, all.q@{n} " in cp.stdout for i, n in enumerate(COMPUTE_HOSTS))
    assert 0 < bed.boot_seconds() <= 60
    inv = subprocess.run([str(BED_SCRIPT), "inventory"], capture_output=True, text=True, check=True).stdout
    assert "controller ansible_host=10.199.77.20 ansible_user=cluser" in inv
