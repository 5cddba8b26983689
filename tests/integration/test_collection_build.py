"""The collection builds, installs, and documents every module (issue 2, section 1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODULES = ["free_port", "reverse_tunnel", "scheduler_job_info", "scheduler_submit", "service_json", "session_ready",
           "session_state"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    subprocess.run([BIN / "ansible-galaxy", "collection", "build", REPO, "--output-path", out, "--force"],
                   check=True, capture_output=True, text=True)
    (tarball,) = out.glob("hpc-interactive-*.tar.gz")
    dest = tmp_path_factory.mktemp("collections")
    # --force: the venv's pip package ships the same version, which ansible-galaxy would call installed already
    res = subprocess.run([BIN / "ansible-galaxy", "collection", "install", tarball, "-p", dest, "--force"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    return tarball, dest


def test_artifact_ships_the_collection_and_not_the_dev_files(installed):
    tarball, _ignored = installed
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    for module in MODULES:
        assert f"plugins/modules/{module}.py" in names
    assert "meta/runtime.yml" in names and "MANIFEST.json" in names
    assert not any(n.startswith(("tests/bed", "tests/unit", "scripts/", "src/", ".ci")) for n in names)


def test_installed_version_matches_galaxy_yml(installed):
    _ignored, dest = installed
    manifest = json.loads((dest / "ansible_collections/hpc/interactive/MANIFEST.json").read_text())
    info = manifest["collection_info"]
    assert (info["namespace"], info["name"]) == ("hpc", "interactive")
    assert f"version: {info['version']}" in (REPO / "galaxy.yml").read_text()


@pytest.mark.parametrize("module", MODULES)
def test_ansible_doc_shows_the_module(installed, module):
    _ignored, dest = installed
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(dest), ANSIBLE_NOCOLOR="1")
    res = subprocess.run([BIN / "ansible-doc", "--json", f"hpc.interactive.{module}"],
                         capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)[f"hpc.interactive.{module}"]
    assert doc["doc"]["short_description"]
    assert doc["doc"]["options"], "every module takes documented options"
    assert doc["examples"].strip() and doc["return"]
    for name, opt in doc["doc"]["options"].items():
        assert opt.get("description"), f"{module}: option {name} has no description"
    attrs = doc["doc"].get("attributes", {})
    assert attrs.get("check_mode", {}).get("support") in {"full", "partial"}, f"{module}: check mode"
