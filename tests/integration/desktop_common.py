"""Shared by the desktop tests (no tests here): provision the VNC desktop through the vnc role's install entry point.

It runs once per test run, as root in the root namespace (the bed's namespaces have no route to a package registry;
the bed's hosts share the filesystem, so what is installed here is installed on every bed host), with the bed's
installed copy of the collection. Idempotent: a provisioned machine reports no change.
"""
from __future__ import annotations

import os
import subprocess

from sessions_common import INSTALL_PLAY

_done: list = []


def provision_vnc(bed) -> None:
    if _done:
        return
    play = bed.user_tmpdir() / "install-vnc.yml"
    play.write_text(INSTALL_PLAY.format(service="vnc"))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(bed.collections_path),
               ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="False", ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="False",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="False")
    cp = subprocess.run([str(bed.venv / "bin" / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(play)],
                        env=env, capture_output=True, text=True, timeout=1800, cwd=play.parent, check=False)
    assert cp.returncode == 0, f"install of vnc failed:\n{cp.stdout[-4000:]}\n{cp.stderr[-2000:]}"
    _done.append(True)
