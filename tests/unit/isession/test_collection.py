"""Which copy of the collection isession uses: the pin, newest wins, ties go to ansible-playbook's own order."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "src"))

from isession import __version__, cli  # noqa: E402
from isession.collection import (  # noqa: E402
    INSTALL_HINT,
    Collection,
    candidates,
    choose,
    find_collection,
    read_version,
    recorded_copy,
)


def _install(root: Path, version: str, built: bool = True) -> Path:
    path = root / "ansible_collections" / "hpc" / "interactive"
    path.mkdir(parents=True)
    if built:
        (path / "MANIFEST.json").write_text(json.dumps({"collection_info": {"version": version}}))
    else:
        (path / "galaxy.yml").write_text(f"namespace: hpc\nname: interactive\nversion: {version}  # the version\n")
    return path


def test_pinned_roots_first_with_the_collection_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _install(b, "9.9.9")
    env = {"ISESSION_COLLECTIONS": f"{a}:{b}", "HOME": str(tmp_path)}
    col = find_collection(env)
    assert col.root == b and col.version == "9.9.9" and col.source == "$ISESSION_COLLECTIONS"
    _install(a, "1.2.3")
    assert find_collection(env).version == "1.2.3"  # pinned: order, not version


def test_a_cancel_uses_the_copy_its_start_recorded_unless_one_is_pinned(tmp_path):
    started, pinned = tmp_path / "started", tmp_path / "pinned"
    _install(started, "1.0.0")
    col = recorded_copy({"collection": str(started)}, env={})
    assert col is not None and col.root == started and col.version == "1.0.0"
    assert recorded_copy({}, env={}) is None and recorded_copy({"collection": 7}, env={}) is None
    assert recorded_copy({"collection": str(tmp_path / "gone")}, env={}) is None  # uninstalled since: look again
    _install(pinned, "2.0.0")
    col = recorded_copy({"collection": str(started)}, env={"ISESSION_COLLECTIONS": str(pinned)})
    assert col is not None and col.root == pinned and col.source == "$ISESSION_COLLECTIONS"
    assert recorded_copy({"collection": str(started)}, env={"ISESSION_COLLECTIONS": str(tmp_path / "none")}) is None


def test_newest_wins_across_configured_paths_and_the_python_path(tmp_path):
    galaxy, site = tmp_path / "galaxy", tmp_path / "site-packages"
    _install(galaxy, "1.0.0")
    _install(site, "1.10.0", built=False)  # a pip install ships galaxy.yml, not MANIFEST.json
    kw = {"configured": [str(galaxy)], "sys_path": [str(site)]}
    col = find_collection({}, **kw)
    assert (col.root, col.version, col.source) == (site, "1.10.0", "Python path")  # 1.10 > 1.0, not as text
    # a newer galaxy install wins over the pip package's copy
    _install(tmp_path / "home", "2.0.0")
    col = find_collection({}, configured=[str(galaxy), str(tmp_path / "home")], sys_path=[str(site)])
    assert (col.root, col.version, col.source) == (tmp_path / "home", "2.0.0", "collections path")


def test_equal_versions_go_to_the_copy_ansible_playbook_loads_first(tmp_path):
    galaxy, site = tmp_path / "galaxy", tmp_path / "site"
    _install(galaxy, "1.0.0")
    _install(site, "1.0.0")
    assert find_collection({}, configured=[str(galaxy)], sys_path=[str(site)]).root == galaxy
    # ansible-core with collections_scan_sys_path off does not see site-packages: neither does isession
    assert [c.root for c in candidates({}, configured=[str(tmp_path / "x")], scan_sys_path=False,
                                       sys_path=[str(site)])] == []


def test_paths_given_as_their_ansible_collections_dir_count_once(tmp_path):
    _install(tmp_path, "1.0.0")
    found = candidates({}, configured=[str(tmp_path), str(tmp_path / "ansible_collections")],
                       sys_path=[str(tmp_path)])
    assert [c.root for c in found] == [tmp_path]


def test_choose_prefers_real_versions_over_unparsable_ones():
    odd = Collection(Path("/a"), "devel")
    real = Collection(Path("/b"), "0.0.1")
    assert choose([odd, real]) == real
    assert choose([odd, real], pinned=True) == odd
    with pytest.raises(LookupError):
        choose([])


def test_missing_collection_names_where_it_looked_and_real_commands(tmp_path):
    with pytest.raises(LookupError) as exc:
        find_collection({}, configured=[str(tmp_path / "none")], sys_path=[])
    msg = str(exc.value)
    assert str(tmp_path / "none") in msg and INSTALL_HINT in msg
    assert "pip install hpc-interactive" in msg and "ansible-galaxy collection install hpc.interactive" in msg
    assert "scripts/setup" not in msg  # a script the wheel does not ship
    with pytest.raises(LookupError, match="ISESSION_COLLECTIONS="):
        find_collection({"ISESSION_COLLECTIONS": str(tmp_path / "none")})


def test_checkout_is_found_through_its_galaxy_yml():
    # tests/conftest.py keeps .cache/collections/ansible_collections/hpc/interactive -> the checkout
    col = find_collection({"ISESSION_COLLECTIONS": str(REPO / ".cache" / "collections")})
    assert f"version: {col.version}\n" in (REPO / "galaxy.yml").read_text()
    assert read_version(REPO) == col.version


def test_isession_and_the_collection_have_one_version():
    assert read_version(REPO) == __version__


def test_cli_collection_command(tmp_path, monkeypatch, capsys):
    _install(tmp_path, "0.0.7")
    monkeypatch.setenv("ISESSION_COLLECTIONS", str(tmp_path))
    assert cli.main(["collection"]) == 0
    assert "hpc.interactive 0.0.7 at" in capsys.readouterr().out
    assert cli.main(["collection", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["used"]["version"] == "0.0.7" and doc["used"]["root"] == str(tmp_path)


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isession", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path]), **env})


def test_version_names_the_copy_in_use_and_the_others(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _install(old, "99.0.1")  # newer than any real copy (the venv's pip package ships one)
    _install(new, "99.0.2")
    out = _run({"ANSIBLE_COLLECTIONS_PATH": f"{old}:{new}", "ISESSION_COLLECTIONS": ""}, "--version")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"isession {__version__}"
    assert lines[1] == f"collection: hpc.interactive 99.0.2 at {new}/ansible_collections/hpc/interactive " \
                       "(collections path)"
    assert f"also found: hpc.interactive 99.0.1 at {old}/ansible_collections/hpc/interactive" in out.stdout
    assert lines[-1].startswith("ansible-core 2.")


def test_commands_without_the_collection_exit_3_naming_real_commands(tmp_path):
    out = _run({"ISESSION_COLLECTIONS": str(tmp_path / "nothing")}, "list")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "pip install hpc-interactive" in out.stderr and "Traceback" not in out.stderr
    # --help, --version and config still work
    assert _run({"ISESSION_COLLECTIONS": str(tmp_path / "nothing")}, "--help").returncode == 0
    assert _run({"ISESSION_COLLECTIONS": str(tmp_path / "nothing"), "HOME": str(tmp_path)}, "config").returncode == 0


BYTECODE_REPORT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from isession.collection import Collection, activate
activate(Collection(root=Path(sys.argv[2]), version="1.0.0", source="test"), plugins=False)
from ansible_collections.hpc.interactive.plugins.module_utils import _vocabulary
print(sys.pycache_prefix)
print(_vocabulary.__spec__.cached)
"""


def test_a_copy_the_user_cannot_compile_into_is_compiled_once_into_the_users_cache():
    """A system-wide ``ansible-galaxy collection install`` has no bytecode and the user cannot write any there: each
    command would compile the module_utils it imports from source (a cost twenty cancels at once pay on shared cores).
    They are compiled once into ``~/.cache/isession/pycache`` and read from there by the next command."""
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    top = Path(tempfile.mkdtemp(prefix="isession-bytecode-"))
    try:
        top.chmod(0o755)
        shutil.copytree(REPO / "src" / "isession", top / "src" / "isession",
                        ignore=shutil.ignore_patterns("__pycache__"))
        mu = _install(top / "copy", "1.0.0") / "plugins" / "module_utils"
        shutil.copytree(REPO / "plugins" / "module_utils", mu, ignore=shutil.ignore_patterns("__pycache__"))
        home = top / "home"
        home.mkdir()
        os.chown(home, 65534, 65534)
        for path in [top, *top.rglob("*")]:
            if path != home:
                path.chmod(0o755 if path.is_dir() else 0o644)  # root's copy: readable, not writable, by the user

        def run() -> list:
            cp = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I",
                                 "-c", BYTECODE_REPORT, str(top / "src"), str(top / "copy")],
                                capture_output=True, text=True, timeout=60, check=False,
                                env={"HOME": str(home), "PATH": os.environ.get("PATH", "")})
            assert cp.returncode == 0, cp.stderr
            return cp.stdout.split()

        prefix, cached = run()
        assert prefix == str(home / ".cache" / "isession" / "pycache")
        assert cached.startswith(prefix + str(mu)) and Path(cached).is_file()
        stamp = Path(cached).stat().st_mtime_ns
        assert run() == [prefix, cached] and Path(cached).stat().st_mtime_ns == stamp  # read, not compiled again
        assert not (mu / "__pycache__").exists()
        shutil.rmtree(home / ".cache")
        (home / ".cache").mkdir(mode=0o755)  # a cache the user cannot write: no prefix (later imports keep theirs)
        assert run()[0] == "None"
        (mu / "__pycache__").mkdir()  # a copy that was compiled when installed (pip does): its own bytecode is used
        (home / ".cache").rmdir()
        assert run()[0] == "None"
    finally:
        shutil.rmtree(top, ignore_errors=True)
