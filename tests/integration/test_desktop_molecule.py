"""The desktop roles' molecule scenarios: each role on a namespace host reached over SSH (molecule/_namespace_host).

vnc and desktop_app: the install entry point, a session on that host, then testinfra checks the packages, the
session's sockets (websockify on loopback only, Xvnc on a 0600 unix socket and no TCP port), noVNC's page under the
base path, and the app's window maximised. rstudio, matlab, nicedcv: their vendor's software is missing here, so the
session fails at once naming what is missing on which host, and nothing is left running. The scenarios use the bed's
installed copy of the collection (no prerun), and their namespaces (isn-mol-*, 10.203.N.0/24) are not the bed's.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from desktop_common import provision_vnc

pytestmark = pytest.mark.bed

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("scenario,verified",
                         [("vnc", 9), ("desktop_app", 2), ("rstudio", 2), ("matlab", 2), ("nicedcv", 2)])
def test_molecule_scenario(bed, scenario, verified):
    provision_vnc(bed)  # the namespace hosts reach no package registry: the packages come from the root namespace
    venv_bin = str(bed.venv / "bin")
    if not shutil.which("molecule", path=venv_bin):
        pytest.fail(f"molecule is not installed in {venv_bin}")
    env = dict(os.environ)
    env.update({"PATH": f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}",
                "ANSIBLE_COLLECTIONS_PATH": str(bed.collections_path), "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
                "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "PY_COLORS": "0", "NO_COLOR": "1"})
    cp = subprocess.run([f"{venv_bin}/molecule", "test", "-s", scenario], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=1200, check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-6000:]
    for step in ("create", "converge", "verify", "cleanup", "destroy"):
        assert re.search(rf"{scenario} > {step}\] Executed: Successful", out), (step, out[-3000:])
    passed = re.search(r"^=+ (\d+) passed in [\d.]+s =+$", out, re.MULTILINE)
    assert passed and int(passed.group(1)) == verified, out[-3000:]
    assert "Another version of 'hpc.interactive'" not in out
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert "isn-mol-" not in names, names
