"""The pip package and the galaxy artifact as users get them.

* the wheel (built from the checkout and from the sdist) holds isession and, under
  ``ansible_collections/hpc/interactive``, exactly the files of the galaxy artifact;
* in a fresh venv, ``pip install <wheel>`` alone gives a working ``isession`` (start nginx -> Running, cancel ->
  nothing left), ``ansible-doc`` and ``ansible-playbook hpc.interactive.start_nginx``, run as wsuser on the bed;
* a newer copy installed with ``ansible-galaxy collection install`` into a configured collections path is the one
  isession then uses (``--version`` says so), and it starts and cancels sessions the same way;
* plain ``ansible-lint`` passes in a fresh clone.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, also under --import-mode=importlib
from sessions_common import WS_USER, http_get, listening, reservations, session_processes, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFIX = "ansible_collections/hpc/interactive/"
NOT_IN_WHEEL = {"MANIFEST.json", "FILES.json"}  # written by ansible-galaxy ...
NOT_IN_GALAXY = {"galaxy.yml"}  # ... which leaves out galaxy.yml, the wheel's copy's source of its version
VERSION = next(line.split(":", 1)[1].strip() for line in (REPO / "galaxy.yml").read_text().splitlines()
               if line.startswith("version:"))


def run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 900)
    cp = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False, **kw)
    assert cp.returncode == 0, f"{argv} -> {cp.returncode}\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}"
    return cp


def checkout_copy(dest: Path, version: str = "") -> Path:
    """This checkout's files (tracked and new); with ``version``, galaxy.yml says that version."""
    names = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    for name in filter(None, names.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name, follow_symlinks=False)
    if version:
        galaxy = dest / "galaxy.yml"
        galaxy.write_text("".join(f"version: {version}\n" if line.startswith("version:") else line
                                  for line in galaxy.read_text().splitlines(keepends=True)))
    return dest


def galaxy_build(src: Path, out: Path) -> Path:
    run([BIN / "ansible-galaxy", "collection", "build", src, "--output-path", out, "--force"])
    (tarball,) = out.glob("hpc-interactive-*.tar.gz")
    return tarball


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The wheel and sdist (``python -m build``, isolated like pip does it) and the galaxy artifact."""
    out = tmp_path_factory.mktemp("dist")
    src = checkout_copy(tmp_path_factory.mktemp("src"))
    run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", out, src], timeout=1800)
    (wheel,) = out.glob("hpc_interactive-*.whl")
    (sdist,) = out.glob("hpc_interactive-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "galaxy": galaxy_build(src, tmp_path_factory.mktemp("galaxy"))}


def wheel_files(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    return {"collection": {n[len(PREFIX):] for n in names if n.startswith(PREFIX)},
            "isession": {n for n in names if n.startswith("isession/")}, "all": set(names)}


def galaxy_files(tarball: Path) -> set:
    with tarfile.open(tarball) as tar:
        return {m.name for m in tar.getmembers() if m.isfile()} - NOT_IN_WHEEL


def test_wheel_ships_isession_and_the_galaxy_artifacts_files(built):
    files = wheel_files(built["wheel"])
    files["collection"] -= NOT_IN_GALAXY
    galaxy = galaxy_files(built["galaxy"])
    assert files["collection"] == galaxy, (sorted(files["collection"] - galaxy), sorted(galaxy - files["collection"]))
    assert {"isession/cli.py", "isession/commands.py", "isession/collection.py"} <= files["isession"]
    assert not {n for n in files["all"] if "__pycache__" in n or n.endswith(".pyc")}
    for needed in ("plugins/modules/free_port.py", "playbooks/start_nginx.yml", "roles/session/tasks/summary.yml",
                   "meta/runtime.yml", "LICENSE", "examples/inventories/slurm.yml"):
        assert needed in files["collection"], needed
    assert not {n for n in galaxy if n.startswith(("tests/", "changelogs/fragments/"))}


def test_sdist_builds_the_same_wheel(built, tmp_path):
    out = tmp_path / "from-sdist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", out, built["sdist"]],
        timeout=1800)
    (again,) = out.glob("hpc_interactive-*.whl")
    assert wheel_files(again)["all"] - {n for n in wheel_files(again)["all"] if ".dist-info/" in n} == \
        wheel_files(built["wheel"])["all"] - {n for n in wheel_files(built["wheel"])["all"] if ".dist-info/" in n}


# ---------------------------------------------------------------- a fresh venv as a user makes it
@pytest.fixture(scope="module")
def fresh_venv(bed, built):
    """``python3 -m venv`` + ``pip install <wheel>`` (as root, from the machine's namespace: the registry is there)."""
    base = bed.user_tmpdir(WS_USER)
    venv = base / "venv"
    run(["/usr/bin/python3", "-m", "venv", venv])
    run([venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", built["wheel"]], timeout=1800)
    for dirpath, dirnames, filenames in os.walk(venv):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444 | (0o111 if os.path.isdir(path) else 0))
    os.chmod(base, 0o755)  # noqa: S103 - wsuser runs the venv
    return venv


class User:
    """wsuser in the bed's workspace with nothing but the fresh venv on PATH (no checkout, no bed copy)."""

    def __init__(self, bed, venv: Path, extra_env: dict = None) -> None:
        self.bed, self.venv = bed, venv
        self.tmp = bed.user_tmpdir(WS_USER)
        self.root = self.tmp / "sessions"
        self.env = {"PATH": f"{venv}/bin:/usr/bin:/bin", "ISESSION_ROOT": str(self.root),
                    "ANSIBLE_NOCOLOR": "1", **(extra_env or {})}

    def run(self, *argv: str, rc: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
        cp = self.bed.run("workspace", list(argv), user=WS_USER, env=self.env, timeout=timeout)
        assert cp.returncode == rc, f"{argv} -> {cp.returncode}\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}"
        return cp

    def isession(self, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
        return self.run(str(self.venv / "bin" / "isession"), *args, rc=rc)

    def stop_watcher(self) -> None:
        pidfile = self.root / ".watcher.pid"
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text.isdigit():
            try:
                os.kill(int(text), 15)
            except OSError:
                pass


def start_serve_cancel(user: User, sid: str) -> dict:
    """isession start nginx -> Running, serves with the secret -> isession cancel -> nothing of it left."""
    start = json.loads(user.isession("start", "nginx", "--id", sid, "--json").stdout)
    assert start["status"] == "Running", start
    service = json.loads(Path(start["service_json"]).read_text())
    port = int(service["PORT"])
    secret = (user.root / sid / "secret").read_text().strip()
    code, _body = http_get(user.bed, "workspace", start["url"], f"Authorization: Bearer {secret}", user.tmp)
    assert code == 200
    cancel = json.loads(user.isession("cancel", sid, "--json").stdout)
    assert cancel["status"] == "Cancelled", cancel
    assert wait_until(lambda: not listening(user.bed, "workspace", port), 10)
    assert wait_until(lambda: not session_processes(sid), 10), session_processes(sid)
    assert reservations(sid) == []
    return json.loads((user.root / sid / "logs" / "runner" / "cli.json").read_text())


@pytest.mark.bed
def test_pip_install_of_the_wheel_alone_starts_and_cancels_a_session(bed, fresh_venv):
    user = User(bed, fresh_venv)
    try:
        version = user.isession("--version").stdout
        site = next(fresh_venv.glob("lib/python3*/site-packages"))
        assert f"collection: hpc.interactive {VERSION} at {site}/ansible_collections/hpc/interactive (Python path)" \
            in version, version
        assert "Service inputs:" in user.isession("describe", "nginx").stdout
        doc = user.run(str(fresh_venv / "bin" / "ansible-doc"), "hpc.interactive.free_port").stdout
        assert "hpc.interactive.free_port" in doc and "reserves" in doc
        cli = start_serve_cancel(user, f"pip-{int(time.time())}")
        assert cli["collection"] == str(site)
        # ansible-playbook with the collection's FQCN, from the same venv, and its closing summary
        sid = f"pip-play-{int(time.time())}"
        play = user.run(str(fresh_venv / "bin" / "ansible-playbook"), "hpc.interactive.start_nginx",
                        "-e", f"session_id={sid}", "-e", f"session_root={user.root}")
        assert f"session {sid} (Running)" in play.stdout and "cancel: ansible-playbook hpc.interactive.cancel" \
            in play.stdout, play.stdout[-3000:]
        user.run(str(fresh_venv / "bin" / "ansible-playbook"), "hpc.interactive.cancel", "-e", f"session_id={sid}",
                 "-e", f"session_root={user.root}")
        assert json.loads((user.root / sid / "service.json").read_text())["JOB_STATUS"] == "Cancelled"
        assert wait_until(lambda: not session_processes(sid), 10), session_processes(sid)
    finally:
        user.stop_watcher()


@pytest.mark.bed
def test_a_newer_galaxy_install_in_a_collections_path_is_used(bed, fresh_venv, tmp_path):
    galaxy_root = bed.user_tmpdir(WS_USER) / "collections"
    tarball = galaxy_build(checkout_copy(tmp_path / "src", version="99.0.0"), tmp_path / "out")
    run([fresh_venv / "bin" / "ansible-galaxy", "collection", "install", tarball, "-p", galaxy_root])
    for dirpath, _dirnames, filenames in os.walk(galaxy_root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - wsuser reads the installed copy
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    user = User(bed, fresh_venv, {"ANSIBLE_COLLECTIONS_PATH": str(galaxy_root)})
    try:
        version = user.isession("--version").stdout
        assert f"collection: hpc.interactive 99.0.0 at {galaxy_root}/ansible_collections/hpc/interactive " \
               "(collections path)" in version, version
        assert f"also found: hpc.interactive {VERSION} at" in version, version
        cli = start_serve_cancel(user, f"galaxy-{int(time.time())}")
        assert cli["collection"] == str(galaxy_root)  # the playbooks ran from the galaxy copy
    finally:
        user.stop_watcher()


def test_ansible_lint_passes_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "--quiet", REPO, clone])
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "NO_COLOR": "1"}
    user_copy = Path(env["HOME"]) / ".ansible" / "collections" / "ansible_collections" / "hpc"
    had = user_copy.exists()
    cp = run([BIN / "ansible-lint"], cwd=clone, env=env)
    assert "Passed" in cp.stdout + cp.stderr
    assert user_copy.exists() == had, "ansible-lint installed the collection into ~/.ansible"
