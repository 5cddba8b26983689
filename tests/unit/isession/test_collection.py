from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "src"))

from isession import cli  # noqa: E402
from isession.collection import find_collection, search_roots  # noqa: E402


def _install(root: Path, version: str) -> Path:
    path = root / "ansible_collections" / "hpc" / "interactive"
    path.mkdir(parents=True)
    (path / "MANIFEST.json").write_text(json.dumps({"collection_info": {"version": version}}))
    return path


def test_first_root_with_the_collection_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _install(b, "9.9.9")
    env = {"ISESSION_COLLECTIONS": f"{a}:{b}", "HOME": str(tmp_path)}
    col = find_collection(env)
    assert col.root == b and col.version == "9.9.9"
    _install(a, "1.2.3")
    assert find_collection(env).version == "1.2.3"


def test_missing_collection_names_where_it_looked(tmp_path):
    env = {"ISESSION_COLLECTIONS": str(tmp_path / "none"), "HOME": str(tmp_path)}
    with pytest.raises(LookupError, match=str(tmp_path / "none")):
        find_collection(env, prefix=str(tmp_path / "venv"))


def test_search_roots_are_unique(tmp_path):
    env = {"ISESSION_COLLECTIONS": str(tmp_path), "ANSIBLE_COLLECTIONS_PATH": str(tmp_path), "HOME": str(tmp_path)}
    roots = search_roots(env)
    assert roots.count(tmp_path) == 1


def test_checkout_is_found_through_its_galaxy_yml():
    # tests/conftest.py keeps .cache/collections/ansible_collections/hpc/interactive -> the checkout
    env = {"ISESSION_COLLECTIONS": str(REPO / ".cache" / "collections"), "HOME": "/nonexistent"}
    col = find_collection(env)
    galaxy = (REPO / "galaxy.yml").read_text()
    assert f"version: {col.version}" in galaxy


def test_cli_collection_command(tmp_path, monkeypatch, capsys):
    _install(tmp_path, "0.0.7")
    monkeypatch.setenv("ISESSION_COLLECTIONS", str(tmp_path))
    assert cli.main(["collection"]) == 0
    assert "hpc.interactive 0.0.7" in capsys.readouterr().out


def test_cli_version():
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                          "from isession import cli; cli.main(['--version'])", str(REPO / "src")],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "isession 0.1.0"
