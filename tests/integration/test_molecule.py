"""``molecule test -s NAME`` for every scenario under molecule/ (one per role), as root.

Each scenario's host is a network namespace with sshd, made and removed by the scenario itself (molecule/shared).
Its network has no route to a package index, so the install scenarios converge where the software is already
provisioned: this test provisions it first from the root namespace with the same install entry points (idempotent,
quick when the suite's set-up already did it). After each scenario nothing of it is left: no namespace, no veth,
no process, and no copy of the collection installed behind the user's back.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ALL_SCENARIOS = sorted(p.parent.name for p in (REPO / "molecule").glob("*/molecule.yml"))


def _shared_layout(scenario: str) -> bool:
    """A scenario on molecule/shared's namespace host (its platforms name ``netns`` and ``subnet``)."""
    platforms = yaml.safe_load((REPO / "molecule" / scenario / "molecule.yml").read_text()).get("platforms") or []
    return bool(platforms) and all("netns" in p and "subnet" in p for p in platforms)


# the desktop roles' scenarios bring their own host (molecule/_namespace_host): test_desktop_molecule.py runs them
SCENARIOS = [s for s in ALL_SCENARIOS if _shared_layout(s)]
ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if p.is_dir() and not p.name.startswith("_"))
INSTALL_SERVICES = ("nginx", "jupyterlab", "notebook", "code_server")
COLLECTIONS = REPO / ".cache" / "collections"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="molecule's hosts are network namespaces: root only")


def quiet_env() -> dict:
    env = dict(os.environ)
    env.update({"PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
                "PY_COLORS": "0", "NO_COLOR": "1", "TERM": "dumb"})
    env.pop("ANSIBLE_COLLECTIONS_PATH", None)
    return env


def test_every_role_has_a_scenario():
    assert set(ROLES) <= set(ALL_SCENARIOS), \
        f"roles without a molecule scenario: {sorted(set(ROLES) - set(ALL_SCENARIOS))}"


def test_scenarios_use_their_own_namespaces_and_subnets():
    platforms = [p for s in SCENARIOS for p in yaml.safe_load((REPO / "molecule" / s / "molecule.yml").read_text())
                 ["platforms"]]
    names = [p["netns"] for p in platforms]
    subnets = [p["subnet"] for p in platforms]
    assert len(set(names)) == len(names) and len(set(subnets)) == len(subnets)
    assert not any(n.startswith("hpcbed") for n in names) and "10.199.77" not in subnets


@pytest.fixture(scope="module")
def provisioned():
    """Every service's software, installed from the root namespace (where package indexes are reachable)."""
    link = COLLECTIONS / "ansible_collections" / "hpc" / "interactive"
    assert link.resolve() == REPO, "tests/conftest.py links the checkout there"
    env = dict(quiet_env(), ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false")
    for service in INSTALL_SERVICES:
        cp = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                             "-e", "ansible_python_interpreter=/usr/bin/python3", "hpc.interactive.install",
                             "-e", f"install_service={service}"], cwd="/", env=env, capture_output=True, text=True,
                            timeout=3600, check=False)
        assert cp.returncode == 0, f"provisioning {service} failed:\n{cp.stdout[-3000:]}\n{cp.stderr[-2000:]}"


def _leftovers(scenario: str) -> list:
    platforms = yaml.safe_load((REPO / "molecule" / scenario / "molecule.yml").read_text())["platforms"]
    netns = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    out = [f"namespace {p['netns']}" for p in platforms if p["netns"] in netns]
    out += [f"veth {p['netns']}-h" for p in platforms if f" {p['netns']}-h@" in links or f" {p['netns']}-h:" in links]
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario, provisioned):
    user_copy = Path.home() / ".ansible" / "collections" / "ansible_collections" / "hpc" / "interactive"
    had_user_copy = user_copy.exists()
    cp = subprocess.run([str(BIN / "molecule"), "test", "-s", scenario], cwd=REPO, env=quiet_env(),
                        capture_output=True, text=True, timeout=3600, check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-8000:]
    for action in ("create", "converge", "idempotence", "verify", "destroy"):
        assert re.search(rf"{scenario} (?:>|➜) {action}\]?:? Executed: Successful", out), (action, out[-4000:])
    verified = re.search(r"=+ (\d+) passed in [\d.]+s =+", out)
    assert verified and int(verified.group(1)) >= 3, out[-3000:]
    assert "Molecule executed 1 scenario (1 successful)" in out, out[-3000:]
    assert _leftovers(scenario) == []
    assert user_copy.exists() == had_user_copy, "molecule installed a copy of the collection in ~/.ansible"
