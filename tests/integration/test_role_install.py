"""The service roles' ``install`` entry points on the bed: idempotent, world-usable, and molecule.

Each install runs through real ansible-playbook as root on the machine itself (installing needs become and the
package registries, which the bed's namespaces cannot reach; the bed's hosts share its filesystem, so the
software is then on every host). A second run reports
``changed=0``, a check-mode run too, and the installed command runs as a cluster user on a compute host.
Each install entry point also runs as a molecule scenario on a host of its own (tests/integration/test_molecule.py).
The install playbook (``hpc.interactive.install``) leaves the host's port reservation directory root-owned,
mode 1777, as ``plugins/module_utils/_ports.py`` expects it, and a second run changes nothing.
"""
from __future__ import annotations

import ast
import json
import os
import pwd
import stat
import time
from pathlib import Path

import pytest
from sessions_common import install_service

pytestmark = pytest.mark.bed

REPO = Path(__file__).resolve().parents[2]
APPS = "/opt/hpc-interactive/apps"
# service -> (command run as a cluster user on compute1, what its output starts with)
VERSION = {
    "jupyterlab": ([f"{APPS}/jupyterlab/bin/jupyter-lab", "--version"], "4."),
    "notebook": ([f"{APPS}/notebook/bin/jupyter-notebook", "--version"], "7."),
    "code_server": ([f"{APPS}/code-server/bin/code-server", "--config", "/dev/null", "--version"], "4.100.3 "),
    "nginx": (["/bin/sh", "-c", "/usr/sbin/nginx -v 2>&1"], "nginx version: nginx/1."),
}


def _install(bed, service, check=False):
    res = install_service(bed, service, check=check)
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


# ---------------------------------------------------------------- the port reservation directory
INSTALL_PLAYBOOK = "- name: Run hpc.interactive.install\n  ansible.builtin.import_playbook: hpc.interactive.install\n"


def _ports_default_dir() -> Path:
    """``DEFAULT_DIR`` of plugins/module_utils/_ports.py, read from the source (no second copy of the path)."""
    tree = ast.parse((REPO / "plugins" / "module_utils" / "_ports.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "DEFAULT_DIR" for t in node.targets):
            return Path(ast.literal_eval(node.value))
    raise AssertionError("no DEFAULT_DIR in _ports.py")


def _install_playbook(bed, **extra):
    extra_vars = {"install_service": "nginx", "ansible_python_interpreter": "/usr/bin/python3", **extra}
    return bed.playbook_json(INSTALL_PLAYBOOK, host=None, user="root", extra_vars=extra_vars, timeout=900)


def _owner_mode(path: Path):
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_install_playbook_makes_the_port_reservation_dir_root_owned_1777(bed):
    ports_dir = _ports_default_dir()  # the directory free_port and the agent use
    first = _install_playbook(bed)
    assert first.rc == 0, f"install playbook failed:\n{first.stdout[-4000:]}\n{first.stderr[-2000:]}"
    assert first["stats"]["localhost"]["failures"] == 0
    assert _owner_mode(ports_dir) == (True, 0, 0, 0o1777), _owner_mode(ports_dir)
    again = _install_playbook(bed)
    assert again.rc == 0, again.stdout[-4000:]
    assert again["stats"]["localhost"]["changed"] == 0, f"second run changed: {_changed_tasks(again)}"
    assert _owner_mode(ports_dir) == (True, 0, 0, 0o1777)
    # an ordinary user reserves and releases a port in the root-owned directory
    owner = f"install-test-{os.getpid()}"
    script = str(bed.collections_path / "ansible_collections/hpc/interactive/plugins/module_utils/_ports.py")
    home = bed.user_tmpdir("cluser")
    res = bed.run("compute1", ["/usr/bin/python3", script, "reserve", "--owner", owner, "--lease", "60"],
                  user="cluser", env={"HOME": str(home)}, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    port = json.loads(res.stdout)["ports"][0]
    record = ports_dir / f"port-{port}"
    assert record.is_file() and record.stat().st_uid != 0
    rel = bed.run("compute1", ["/usr/bin/python3", script, "release", "--owner", owner], user="cluser",
                  env={"HOME": str(home)}, timeout=60)
    assert rel.returncode == 0 and not record.exists(), rel.stdout + rel.stderr


def test_install_takes_over_a_user_made_ports_dir_and_refuses_a_symlink(bed):
    """A directory a user made first becomes root:root 1777; a symlink there is refused, its target untouched."""
    base = f"/tmp/isession-ports-t{os.getpid()}-{time.monotonic_ns()}"
    user_dir, link, target = Path(base + "-user"), Path(base + "-link"), Path(base + "-target")
    try:
        bed.run("workspace", ["mkdir", "-m", "0700", str(user_dir)], user="wsuser", check=True)
        res = _install_playbook(bed, session_ports_dir=str(user_dir))
        assert res.rc == 0, res.stdout[-4000:]
        assert _owner_mode(user_dir) == (True, 0, 0, 0o1777)

        bed.run("workspace", ["mkdir", "-m", "0700", str(target)], user="wsuser", check=True)
        bed.run("workspace", ["ln", "-s", str(target), str(link)], user="wsuser", check=True)
        res = _install_playbook(bed, session_ports_dir=str(link))
        assert res.rc != 0
        assert f"{link} exists and is not a directory" in res.stdout, res.stdout[-3000:]
        assert os.path.islink(link)
        ws = pwd.getpwnam("wsuser")
        assert _owner_mode(target) == (True, ws.pw_uid, ws.pw_gid, 0o700)
    finally:
        for path in (link, user_dir, target):
            if os.path.islink(path):
                path.unlink()
            elif path.is_dir():
                path.rmdir()
