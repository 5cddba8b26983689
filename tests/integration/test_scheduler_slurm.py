"""scheduler_submit / scheduler_job_info against the bed's real Slurm, as wsuser -> cluser@controller."""
from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.bed
SITE = Path("/etc/isession/site.yml")


def _name(tag: str) -> str:
    return "it-%s-%s" % (tag, uuid.uuid4().hex[:8])


def _squeue_names(bed, name: str):
    out = bed.slurm(["squeue", "-h", "--name=" + name, "-o", "%i|%T"], check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def _submit(bed, **args):
    base = {"scheduler": "slurm", "script": "hostname\nsleep 300\n", "workdir": "/home/cluser/it-sched"}
    base.update(args)
    return bed.ansible_module("hpc.interactive.scheduler_submit", base, target="controller")


def test_slurm_lifecycle(bed):
    name = _name("life")
    # check mode: rendered script returned, nothing submitted, nothing written
    res = bed.ansible_module("hpc.interactive.scheduler_submit",
                             {"scheduler": "slurm", "job_name": name, "script": "sleep 300",
                              "workdir": "/home/cluser/it-sched", "walltime": 10}, target="controller", check=True)
    assert res.get("changed") is True and not res.get("failed"), res
    assert "#SBATCH --job-name=%s" % name in res["script"] and "#SBATCH --time=00:10:00" in res["script"]
    assert _squeue_names(bed, name) == []
    assert not os.path.exists(res["script_path"])
    # real submit, wait until running
    res = _submit(bed, job_name=name, walltime=10, wait_for="running", wait_timeout=60)
    assert res.get("changed") is True and res["state"] == "running", res
    job_id = res["job_id"]
    assert set(res["nodes"]) <= {"compute1", "compute2"} and res["nodes"]
    st = os.stat(res["script_path"])
    assert st.st_mode & 0o777 == 0o700
    # rerun: same job, no second submit
    again = _submit(bed, job_name=name, walltime=10)
    assert again.get("changed") is False and again["job_id"] == job_id, again
    assert len(_squeue_names(bed, name)) == 1
    # info (one call for several ids, one of them unknown)
    info = bed.ansible_module("hpc.interactive.scheduler_job_info",
                              {"scheduler": "slurm", "job_ids": [job_id, "999999"]}, target="controller")
    assert info["reachable"] is True
    assert info["jobs"][job_id]["state"] == "running" and info["jobs"][job_id]["found"] is True
    assert info["jobs"]["999999"]["found"] is False and info["jobs"]["999999"]["state"] == "undetermined"
    # cancel, then gone; cancel again is a no-op
    gone = bed.ansible_module("hpc.interactive.scheduler_submit",
                              {"scheduler": "slurm", "state": "absent", "job_id": job_id}, target="controller")
    assert gone.get("changed") is True, gone
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [line.split("|")[1] for line in _squeue_names(bed, name)]
        if all(s == "CANCELLED" for s in states):
            break
        time.sleep(0.5)
    assert all(s == "CANCELLED" for s in states), states
    info = bed.ansible_module("hpc.interactive.scheduler_job_info", {"scheduler": "slurm", "job_ids": [job_id]},
                              target="controller")
    assert info["jobs"][job_id]["state"] in ("cancelled", "undetermined")
    again = bed.ansible_module("hpc.interactive.scheduler_submit",
                               {"scheduler": "slurm", "state": "absent", "job_id": job_id}, target="controller")
    assert again.get("changed") is False and not again.get("failed"), again


@pytest.fixture
def site_file():
    """``with site_file(text):`` — /etc/isession/site.yml (root, 0644) only for the block, then what was there.

    The file is global to the machine (every bed host reads it), so each window covers one module call.
    """
    parent_existed = SITE.parent.exists()

    @contextlib.contextmanager
    def window(text: str, uid: int = 0):
        old = SITE.read_bytes() if SITE.exists() else None
        old_stat = SITE.stat() if old is not None else None
        SITE.parent.mkdir(mode=0o755, exist_ok=True)
        _put(text.encode(), 0o644, uid, uid)
        try:
            yield
        finally:
            if old is None:
                SITE.unlink(missing_ok=True)
            else:
                _put(old, old_stat.st_mode & 0o7777, old_stat.st_uid, old_stat.st_gid)

    yield window
    if not parent_existed:
        try:
            SITE.parent.rmdir()
        except OSError:
            pass  # someone else put a file there meanwhile


def _put(data: bytes, mode: int, uid: int, gid: int) -> None:
    tmp = SITE.with_name(".site.yml.%d" % os.getpid())
    tmp.write_bytes(data)
    os.chown(tmp, uid, gid)
    os.chmod(tmp, mode)
    os.replace(tmp, SITE)


def test_enforced_directive_wins_over_extra_vars(bed, site_file):
    name = _name("site")
    play = ("- hosts: controller\n  gather_facts: false\n  tasks:\n    - name: submit\n"
            "      hpc.interactive.scheduler_submit:\n        scheduler: slurm\n        job_name: %s\n"
            "        workdir: /home/cluser/it-sched\n        script: sleep 300\n"
            "        directives: \"{{ user_directives }}\"\n        walltime: \"{{ user_walltime }}\"\n" % name)
    with site_file("schedulers:\n  slurm:\n    enforced_directives: ['--comment=site-enforced', '--time=00:07:00']\n"
                   "    max_walltime: '02:00:00'\n"):
        res = bed.playbook_json(play, extra_vars={"user_directives": ["--comment=user-wins?", "-t 00:30:00"],
                                                  "user_walltime": "01:00:00"})
    task = res.task("submit", "controller")
    assert res.rc == 0 and task.get("changed") is True, res.stdout
    try:
        job = bed.slurm(["scontrol", "show", "job", "-o", task["job_id"]]).stdout
        assert "Comment=site-enforced" in job and "TimeLimit=00:07:00" in job, job
        assert "user-wins" not in task["script"]
        assert sorted(task["removed_directives"]) == ["--comment=user-wins?", "--time=01:00:00", "-t 00:30:00"]
    finally:
        bed.slurm(["scancel", task["job_id"]], check=False)
    # a site limit (checked on the effective directives): a clear error, nothing submitted
    over_name = _name("over")
    with site_file("schedulers:\n  slurm:\n    max_walltime: '02:00:00'\n"):
        over = _submit(bed, job_name=over_name, walltime="03:00:00")
    assert over.get("failed") and over["msg"].startswith("walltime:") and "max_walltime" in over["msg"], over
    assert _squeue_names(bed, over_name) == []
    # a site file that is not root-owned is refused: nothing submitted
    owner_name = _name("owner")
    with site_file("schedulers: {}\n", uid=1):
        refused = _submit(bed, job_name=owner_name)
    assert refused.get("failed") and refused["msg"].startswith("site_file"), refused
    assert _squeue_names(bed, owner_name) == []


@pytest.mark.parametrize("args,field", [
    ({"job_name": "x;id"}, "job_name"), ({"job_name": "-x"}, "job_name"),
    ({"directives": ["--comment=$(id)"]}, "directives"), ({"directives": ["--comment=a\n#SBATCH -p x"]}, "directives"),
    ({"directives": ["--comment=`id`"]}, "directives"), ({"workdir": "/home/cluser/a\nb"}, "workdir"),
    ({"queue": "debug;id"}, "queue"), ({"account": "-A"}, "account"), ({"output": "/tmp/$(id)"}, "output"),
])
def test_hostile_inputs_refused(bed, args, field):
    name = args.get("job_name") or _name("bad")
    params = {"job_name": name}
    params.update(args)
    res = _submit(bed, **params)
    assert res.get("failed") and res["msg"].startswith(field + ":"), res
    names = bed.slurm(["squeue", "-h", "--states=all", "-u", "cluser", "-o", "%j"]).stdout.splitlines()
    assert name not in names  # other tests may run cluser jobs meanwhile: look for ours only
    if re.match(r"^[\w.-]+$", name):
        assert not os.path.exists("/home/cluser/it-sched/%s.sh" % name)


def test_unreachable_controller_is_undetermined(bed):
    conf = Path(bed.user_tmpdir("cluser")) / "slurm.conf"
    text = Path("/etc/slurm/slurm.conf").read_text()
    text = re.sub(r"(?m)^SlurmctldHost=.*$", "SlurmctldHost=controller(127.0.0.1)", text)
    text = re.sub(r"(?m)^SlurmctldPort=.*$", "", text) + "\nSlurmctldPort=9\nMessageTimeout=2\n"
    bed.write_user_file("cluser", conf, text, mode=0o644)
    play = ("- hosts: controller\n  gather_facts: false\n  tasks:\n    - name: info\n"
            "      environment: {SLURM_CONF: '%s'}\n      hpc.interactive.scheduler_job_info:\n"
            "        scheduler: slurm\n        job_ids: ['1', '2']\n        timeout: 5\n" % conf)
    res = bed.playbook_json(play)
    task = res.task("info", "controller")
    assert res.rc == 0 and not task.get("failed"), task
    assert task["reachable"] is False
    assert {j["state"] for j in task["jobs"].values()} == {"undetermined"} and set(task["jobs"]) == {"1", "2"}
