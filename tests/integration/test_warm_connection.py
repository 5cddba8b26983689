"""warm_connection on the bed: the master it opens to the controller is the one the next tasks use.

As ``wsuser`` on the workspace, against the bed's controller over real ssh: a play that only warms returns while
the handshake may still run; the master's socket then appears in the control path directory of ansible-core's ssh
connection, and a later play's task on the controller goes through that same master (same socket, same master pid)
instead of opening its own. A local connection and check mode open nothing.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("bed")

WARM = """\
- hosts: workspace
  gather_facts: false
  tasks:
    - name: warm the controller
      hpc.interactive.warm_connection:
      delegate_to: controller
    - name: warm a local connection
      hpc.interactive.warm_connection:
    - name: warm in check mode
      hpc.interactive.warm_connection:
      delegate_to: compute1
      check_mode: true
"""

USE = """\
- hosts: workspace
  gather_facts: false
  tasks:
    - name: a task on the controller
      ansible.builtin.command: hostname
      delegate_to: controller
      changed_when: false
"""


def master_pid(bed, socket: Path) -> int:
    cp = bed.run("workspace", ["ssh", "-o", f"ControlPath={socket}", "-O", "check", "cluser@controller"],
                 user="wsuser")
    found = re.search(r"Master running \(pid=(\d+)\)", cp.stderr)
    assert found, (cp.returncode, cp.stderr)
    return int(found.group(1))


def test_the_master_is_open_before_the_first_task_needs_it(bed):
    tmp = bed.user_tmpdir("wsuser")
    cpdir = tmp / "cp"
    env = {"ANSIBLE_SSH_CONTROL_PATH_DIR": str(cpdir)}
    res = bed.playbook_json(WARM, env=env)
    assert res.rc == 0, res.stdout[-3000:]
    warm = res.task("warm the controller")
    assert warm["started"] is True and not warm.get("changed"), warm
    local, check = res.task("warm a local connection"), res.task("warm in check mode")
    assert local["started"] is False and "not ssh" in local["msg"], local
    assert check["started"] is False and "check mode" in check["msg"], check

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (cpdir.is_dir() and any(cpdir.iterdir())):
        time.sleep(0.1)
    sockets = sorted(cpdir.iterdir())
    assert len(sockets) == 1 and sockets[0].is_socket(), sockets  # one master: the controller's, not compute1's
    pid = master_pid(bed, sockets[0])

    res = bed.playbook_json(USE, env=env)
    assert res.rc == 0, res.stdout[-3000:]
    assert res.task("a task on the controller")["stdout"].strip()
    assert sorted(cpdir.iterdir()) == sockets and master_pid(bed, sockets[0]) == pid  # the task went through it
    bed.run("workspace", ["ssh", "-o", f"ControlPath={sockets[0]}", "-O", "exit", "cluser@controller"], user="wsuser")


PREPARE = r"""
- hosts: workspace
  gather_facts: false
  tasks:
    - name: warm the controller and build a payload
      hpc.interactive.warm_connection:
        modules: [hpc.interactive.scheduler_job_info]
      delegate_to: controller
    - name: the payload is in the run's cache before any task shipped the module
      ansible.builtin.find:
        paths: "{{ lookup('ansible.builtin.env', 'ANSIBLE_LOCAL_TEMP') }}"
        recurse: true
        use_regex: true
        # <module FQN>-<compression>-<extensions>: not the .lock or -part files beside it
        patterns: ['^ansible_collections\.hpc\.interactive\.plugins\.modules\.scheduler_job_info-[A-Z_]+-[a-z~]+$']
      register: cached
      until: cached.matched > 0
      retries: 30
      delay: 1
    - name: a task ships the module to the controller
      hpc.interactive.scheduler_job_info:
        scheduler: slurm
        job_name: isession-warm-connection-test-none
      delegate_to: controller
    - name: the cache entry after that task
      ansible.builtin.stat:
        path: "{{ cached.files[0].path }}"
      register: after
"""


def test_the_payload_of_a_module_shipped_later_is_built_in_the_background(bed):
    tmp = bed.user_tmpdir("wsuser")
    local_temp = tmp / "local-temp"
    res = bed.playbook_json(PREPARE, env={"ANSIBLE_LOCAL_TEMP": str(local_temp),
                                          "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp / "cp")})
    assert res.rc == 0, res.stdout[-3000:]
    warm = res.task("warm the controller and build a payload")
    assert warm["prepared"] == ["hpc.interactive.scheduler_job_info"], warm
    cached = res.task("the payload is in the run's cache before any task shipped the module")
    assert cached["matched"] == 1, cached
    info = res.task("a task ships the module to the controller")
    assert not info.get("failed") and info["reachable"] and info["jobs"] == {}, info  # the prebuilt payload runs there
    before, after = cached["files"][0], res.task("the cache entry after that task")["stat"]
    # read, not built again: the same file (a rebuild would have replaced it) at the same time
    assert after["exists"] and after["inode"] == before["inode"] and after["mtime"] == before["mtime"], (before, after)
    # a run's cache is its own: nothing is left after the run
    assert not list(local_temp.glob("ansible-local-*")), sorted(local_temp.iterdir())
