"""The service roles' ``install`` entry points on the bed: idempotent, world-usable, and molecule.

Each install runs through real ansible-playbook (as root on the workspace: installing needs become, and the
bed's hosts share one filesystem, so the software is then on every host). A second run reports
``changed=0``, a check-mode run too, and the installed command runs as a cluster user on a compute host.
The jupyterlab install also runs as a molecule scenario (default driver, testinfra verifier).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.bed

REPO = Path(__file__).resolve().parents[2]
APPS = "/opt/hpc-interactive/apps"
PLAY = """- name: Install {service}
  hosts: localhost
  gather_facts: false
  vars:
    ansible_python_interpreter: /usr/bin/python3
  tasks:
    - name: Run the install entry point
      ansible.builtin.include_role:
        name: hpc.interactive.{service}
        tasks_from: install
"""
# service -> (command run as a cluster user on compute1, what its output starts with)
VERSION = {
    "jupyterlab": ([f"{APPS}/jupyterlab/bin/jupyter-lab", "--version"], "4."),
    "notebook": ([f"{APPS}/notebook/bin/jupyter-notebook", "--version"], "7."),
    "code_server": ([f"{APPS}/code-server/bin/code-server", "--config", "/dev/null", "--version"], "4.100.3 "),
    "nginx": (["/bin/sh", "-c", "/usr/sbin/nginx -v 2>&1"], "nginx version: nginx/1."),
}


def _install(bed, service, check=False):
    res = bed.playbook_json(PLAY.format(service=service), user="root", check=check, timeout=1800)
    assert res.rc == 0, f"install of {service} failed:\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
    return res


def _changed_tasks(res):
    return [t["task"]["name"] for t in res.tasks() for h in t["hosts"].values() if h.get("changed")]


@pytest.mark.parametrize("service", ["jupyterlab", "notebook", "code_server", "nginx"])
def test_install_twice_then_check_mode_changes_nothing(bed, service):
    _install(bed, service)
    again = _install(bed, service)
    assert again["stats"]["localhost"]["changed"] == 0, f"second run changed: {_changed_tasks(again)}"
    assert again["stats"]["localhost"]["failures"] == 0
    check = _install(bed, service, check=True)
    assert check["stats"]["localhost"]["changed"] == 0, f"check mode predicts changes: {_changed_tasks(check)}"
    # installed for everyone: a cluster user runs it on a compute host (HOME elsewhere: no files left behind)
    argv, prefix = VERSION[service]
    home = bed.user_tmpdir("cluser")
    run = bed.run("compute1", argv, user="cluser", env={"HOME": str(home)}, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().startswith(prefix), run.stdout + run.stderr


def test_molecule_jupyterlab_install(bed):
    """molecule test -s jupyterlab_install: converge, idempotence and the testinfra verifier."""
    venv_bin = str(bed.venv / "bin")
    if not shutil.which("molecule", path=venv_bin):
        pytest.fail(f"molecule is not installed in {venv_bin}")
    env = dict(os.environ)
    env.update({
        "PATH": f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_COLLECTIONS_PATH": str(bed.collections_path),
        "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "PY_COLORS": "0",
        "NO_COLOR": "1",
    })
    cp = subprocess.run([f"{venv_bin}/molecule", "test", "-s", "jupyterlab_install"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1800)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-6000:]
    assert re.search(r"jupyterlab_install > idempotence\] Executed: Successful", out), out[-3000:]
    verified = re.search(r"^=+ (\d+) passed in [\d.]+s =+$", out, re.MULTILINE)
    assert verified and int(verified.group(1)) >= 4, out[-3000:]
    assert "Molecule executed 1 scenario (1 successful)" in out, out[-3000:]
    # the scenario used the bed's installed copy of the collection, not one molecule installed itself
    assert "Another version of 'hpc.interactive'" not in out, out[-3000:]
