"""Sessions on the compute target through real Slurm and through the PBS commands (slurm-wlm-torque).

The batch job is the agent: it reserves its node port with the shipped _ports.py, starts nginx and keeps the shipped
_tunnel.py supervisor's ssh -R to the workspace. Checks per host (workspace, compute node, controller): listeners,
processes, the queue. Also: a bad partition is Failed with Slurm's words; a cancel while queued; cancel twice.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sessions_common import (  # noqa: E402
    WS_USER,
    assert_no_secret_in_argv,
    cluster_inventory,
    failure_text,
    http_get,
    listening,
    queue,
    read_json,
    reservations,
    run_playbook,
    session_processes,
    wait_until,
)

pytestmark = pytest.mark.bed
CLUSTER_USER = "cluser"


@pytest.fixture
def root(bed):
    return bed.user_tmpdir(WS_USER) / "sessions"


@pytest.mark.parametrize("scheduler,via", [("slurm", "direct"), ("pbs", "controller")])
def test_nginx_on_compute_start_serve_cancel_twice(bed, root, scheduler, via):
    inv = cluster_inventory(bed, scheduler, via)
    sid = f"nginx-{scheduler}-{int(time.time())}"
    common = dict(session_id=sid, session_root=str(root))
    t0 = time.monotonic()
    res = run_playbook(bed, "hpc.interactive.start_nginx",
                       dict(common, session_target="compute", session_resource="controller",
                            session_start_timeout=60, session_queue_timeout=60), inventory=inv)
    took = time.monotonic() - t0
    assert res.rc == 0, failure_text(res)
    sdir = root / sid
    service = read_json(sdir / "service.json")
    port = int(service["PORT"])
    assert service["JOB_STATUS"] == "Running" and service["ERROR_MESSAGE"] == ""
    state = read_json(sdir / "state.json")
    assert state["scheduler"] == scheduler and state["step"] == "running" and state["job_id"]
    rdir = Path(state["remote_dir"])
    agent = read_json(rdir / "agent.json")
    node, node_port = agent["host"], agent["node_port"]
    assert node in ("compute1", "compute2")
    assert f"isession-{sid}" in queue(bed, f"isession-{sid}") or queue(bed, f"isession-{sid}")
    secret = (sdir / "secret").read_text().strip()
    assert secret not in (rdir / "agent.sh").read_text() and secret not in res.stdout
    assert_no_secret_in_argv(secret)
    assert listening(bed, node, node_port) and listening(bed, "workspace", port)
    tmp = bed.user_tmpdir(WS_USER)
    url = f"http://127.0.0.1:{port}/me/{port}/"
    code, body = http_get(bed, "workspace", url, f"Authorization: Bearer {secret}", tmp)
    assert code == 200 and f"hpc.interactive nginx session {sid}" in body
    assert http_get(bed, "workspace", url, None, tmp)[0] == 401
    print(f"{scheduler} start took {took:.2f} s")

    t0 = time.monotonic()
    res = run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
    assert res.rc == 0, failure_text(res)
    print(f"{scheduler} cancel took {time.monotonic() - t0:.2f} s")
    assert read_json(sdir / "service.json")["JOB_STATUS"] == "Cancelled"
    assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 10), queue(bed, f"isession-{sid}")
    assert wait_until(lambda: not listening(bed, "workspace", port), 10)
    assert wait_until(lambda: not listening(bed, node, node_port), 10)
    for marker in (str(sdir), str(rdir), sid):
        assert wait_until(lambda m=marker: not session_processes(m), 10), session_processes(marker)
    assert wait_until(lambda: reservations(sid) == [], 5), reservations(sid)

    again = run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
    assert again.rc == 0, failure_text(again)
    changed = [t["task"]["name"] for t in again.tasks() for r in t["hosts"].values() if r.get("changed")]
    assert changed == [], changed


def test_bad_partition_is_failed_with_slurms_words(bed, root):
    inv = cluster_inventory(bed, "slurm")
    sid = f"nginx-badpart-{int(time.time())}"
    res = run_playbook(bed, "hpc.interactive.start_nginx",
                       dict(session_id=sid, session_root=str(root), session_target="compute",
                            session_resource="controller", session_partition="nosuchpart"), inventory=inv)
    assert res.rc != 0
    service = read_json(root / sid / "service.json")
    assert service["JOB_STATUS"] == "Failed"
    assert "invalid partition" in service["ERROR_MESSAGE"].lower() and "nosuchpart" in service["ERROR_MESSAGE"]
    assert read_json(root / sid / "state.json")["step"] == "failed"
    assert reservations(sid) == [] and queue(bed, f"isession-{sid}") == ""


def test_cancel_while_queued(bed, root):
    inv = cluster_inventory(bed, "slurm")
    blockers = []
    for _attempt in range(2):  # partition small: MaxCPUsPerNode=2, two 1-CPU jobs fill it
        out = bed.slurm(["sbatch", "--parsable", "-p", "small", "-c", "1", "-J", "isession-test-blocker",
                         "--wrap", "sleep 300"], user=CLUSTER_USER).stdout.strip()
        blockers.append(out.split(";")[0])
    try:
        assert wait_until(lambda: all("RUNNING" in bed.slurm(["squeue", "-h", "-j", b, "-o", "%T"]).stdout
                                      for b in blockers), 30)
        sid = f"nginx-queued-{int(time.time())}"
        common = dict(session_id=sid, session_root=str(root))
        box = {}
        starter = threading.Thread(target=lambda: box.update(res=run_playbook(
            bed, "hpc.interactive.start_nginx",
            dict(common, session_target="compute", session_resource="controller", session_partition="small",
                 session_queue_timeout=120), inventory=inv)))
        starter.start()
        sfile = root / sid / "service.json"
        assert wait_until(lambda: sfile.exists() and read_json(sfile)["JOB_STATUS"] == "Queued", 60), \
            sfile.read_text() if sfile.exists() else "no service.json"
        queued = read_json(sfile)
        assert queued["ERROR_MESSAGE"] in ("Resources", "Priority"), queued
        assert "PENDING" in queue(bed, f"isession-{sid}")
        t0 = time.monotonic()
        res = run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
        assert res.rc == 0, failure_text(res)
        starter.join(120)
        assert not starter.is_alive()
        assert box["res"].rc != 0 and "cancelled" in failure_text(box["res"])
        print(f"cancel while queued: start ended {time.monotonic() - t0:.2f} s after the cancel began")
        assert read_json(sfile)["JOB_STATUS"] == "Cancelled"
        assert read_json(root / sid / "state.json")["step"] == "cancelled"
        assert queue(bed, f"isession-{sid}") == "" and reservations(sid) == []
        again = run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
        assert again.rc == 0, failure_text(again)
        assert json.loads(sfile.read_text())["JOB_STATUS"] == "Cancelled"
    finally:
        bed.slurm(["scancel", *blockers], check=False)


def test_server_missing_on_the_node_is_failed_in_words(bed, root):
    """The agent's own message ("... not found on computeN") reaches ERROR_MESSAGE, and the job is gone."""
    inv = cluster_inventory(bed, "slurm")
    sid = f"nginx-nobin-{int(time.time())}"
    res = run_playbook(bed, "hpc.interactive.start_nginx",
                       dict(session_id=sid, session_root=str(root), session_target="compute",
                            session_resource="controller", session_start_timeout=8,
                            nginx_binary="/nonexistent/nginx"), inventory=inv)
    assert res.rc != 0
    service = read_json(root / sid / "service.json")
    assert service["JOB_STATUS"] == "Failed"
    assert service["ERROR_MESSAGE"] in ("/nonexistent/nginx not found on compute1",
                                        "/nonexistent/nginx not found on compute2"), service
    assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 10)
    assert reservations(sid) == [] and not session_processes(sid)


SLOW_TO_END = """---
- name: nginx whose server's process group is slow to end
  hosts: localhost
  gather_facts: false
  vars:
    ansible_pipelining: true
    slow_to_end: |
      (trap 'sleep 5; exit 0' TERM; while :; do sleep 0.2; done) &
  tasks:
    - name: Describe the nginx service
      ansible.builtin.import_role:
        name: hpc.interactive.nginx
    - name: Give the server's process group a member that ends 5 s after a TERM, after Slurm's KillWait
      ansible.builtin.set_fact:
        session_service_spec: >-
          {{ session_service_spec | combine({'agent_script': slow_to_end ~ session_service_spec.agent_script}) }}
    - name: Start the session
      ansible.builtin.import_role:
        name: hpc.interactive.session
        tasks_from: start
"""


def test_a_server_slow_to_end_does_not_keep_the_node_port_reserved(bed, root):
    """Slurm kills the job KillWait (2 s on the bed) after its TERM, and the agent's cleanup waits up to 10 s for the
    server to end: here a member of the server's group takes 5 s to end after a TERM. The node port's reservation
    must be released before that wait, not after it: the agent does not live to its end."""
    inv = cluster_inventory(bed, "slurm")
    sid = f"nginx-slowend-{int(time.time())}"
    common = dict(session_id=sid, session_root=str(root))
    res = bed.playbook_json(SLOW_TO_END, user=WS_USER, inventory=inv,
                            extra_vars=dict(common, session_target="compute", session_resource="controller",
                                            session_start_timeout=60, session_queue_timeout=60))
    assert res.rc == 0, failure_text(res)
    rdir = Path(read_json(root / sid / "state.json")["remote_dir"])
    agent = read_json(rdir / "agent.json")
    assert agent["node_port"] in reservations(sid)  # held while the session runs
    res = run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
    assert res.rc == 0, failure_text(res)
    assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 20), queue(bed, f"isession-{sid}")
    assert wait_until(lambda: not listening(bed, agent["host"], agent["node_port"]), 10)
    for marker in (str(rdir), sid):
        assert wait_until(lambda m=marker: not session_processes(m), 10), session_processes(marker)
    assert reservations(sid) == []
