"""Ansible on the bed: the inventory, this checkout's collection installed under the bed root, the
``bed_json`` callback, and ansible-playbook or one module run inside a host as a user."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from hpcbed.core import CLUSTER_USERS, COMPUTE_HOSTS, HOSTS, WS_USER, BedError, CommandFailed, PathLike, _log, _sh


class PlaybookResult(dict):
    """Parsed output of the ``bed_json`` callback, plus ``rc``, ``stdout`` and ``stderr``."""

    rc: int = 0
    stdout: str = ""
    stderr: str = ""

    def tasks(self) -> List[dict]:
        return [t for play in self.get("plays", []) for t in play.get("tasks", [])]

    def task(self, name: str, host: Optional[str] = None) -> dict:
        """Result of the first task called ``name`` (for ``host``, or the only host it ran on)."""
        for t in self.tasks():
            if t["task"]["name"] == name:
                hosts = t["hosts"]
                if host is None:
                    if len(hosts) != 1:
                        raise KeyError(f"task {name!r} ran on {sorted(hosts)}: say which host")
                    return next(iter(hosts.values()))
                return hosts[host]
        raise KeyError(f"no task {name!r} in {[t['task']['name'] for t in self.tasks()]}")


class AnsibleMixin:
    """The installed collection and playbook runs."""

    @property
    def inventory_path(self) -> Path:
        return self.root / "inventory.ini"

    @property
    def collections_path(self) -> Path:
        """ANSIBLE_COLLECTIONS_PATH: this object's own installed copy, else the last one installed.

        Each :meth:`install_collection` makes a new copy (``collections/c-<pid>-<time>``) and points
        ``collections/current`` at it, so a session installing its copy never pulls the files from under
        another session's running playbooks.
        """
        if self._collections is not None:
            return self._collections
        return self.root / "collections" / "current"

    @property
    def callback_dir(self) -> Path:
        return self.root / "callback_plugins"

    def install_collection(self, repo: Optional[PathLike] = None) -> Path:
        """Build the collection from the repo and install a world-readable copy under the bed root."""
        repo = Path(repo or self.repo)
        ansible_galaxy = str(self.venv / "bin" / "ansible-galaxy")
        with tempfile.TemporaryDirectory(prefix="hpcbed-build-") as build:
            build_argv = [ansible_galaxy, "collection", "build", str(repo), "--output-path", build, "--force"]
            for attempt in range(3):  # files appearing/vanishing in a busy checkout can fail one walk
                cp = _sh(build_argv, timeout=300, check=False)
                if cp.returncode == 0:
                    break
                _log(f"collection build failed (attempt {attempt + 1}): {cp.stderr.strip()[-500:]}")
                time.sleep(1)
            else:
                raise CommandFailed(cp.returncode, build_argv, cp.stdout, cp.stderr)
            tarballs = sorted(Path(build).glob("*.tar.gz"))
            if not tarballs:
                raise BedError(f"ansible-galaxy built no tarball from {repo}")
            dest = Path(tempfile.mkdtemp(prefix=f"c-{os.getpid()}-", dir=self._collections_base()))
            _sh([ansible_galaxy, "collection", "install", str(tarballs[-1]), "-p", str(dest), "--force"], timeout=300)
        self._world_readable(dest)
        current = dest.parent / "current"
        tmp_link = dest.parent / f".current.{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(dest.name)
        os.replace(tmp_link, current)
        self._collections = dest
        self._install_callback()
        return dest

    def _collections_base(self) -> Path:
        base = self.root / "collections"
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        return base

    def collection_installed(self) -> bool:
        return (self.collections_path / "ansible_collections" / "hpc" / "interactive" / "MANIFEST.json").is_file()

    def _install_callback(self) -> None:
        self.callback_dir.mkdir(parents=True, exist_ok=True)
        self.callback_dir.chmod(0o755)
        src = Path(__file__).parent.with_name("callback_plugins") / "bed_json.py"
        tmp = self.callback_dir / f".bed_json.{os.getpid()}"
        shutil.copyfile(src, tmp)
        tmp.chmod(0o644)
        os.replace(tmp, self.callback_dir / "bed_json.py")

    @staticmethod
    def _world_readable(top: Path) -> None:
        for dirpath, _dirnames, filenames in os.walk(top):
            os.chmod(dirpath, 0o755)  # noqa: S103 - read-only copy every bed user must read
            for name in filenames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    os.chmod(p, os.stat(p).st_mode | 0o444)

    def ansible_env(self, env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        out = {
            "ANSIBLE_COLLECTIONS_PATH": str(self.collections_path),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
            "ANSIBLE_CALLBACK_PLUGINS": str(self.callback_dir),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_LOCALHOST_WARNING": "0",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        out.update(env or {})
        return out

    def _playbook_path(self, playbook: PathLike, user: str) -> Path:
        if isinstance(playbook, str) and "\n" in playbook:  # playbook text: write it where the user can read it
            return self.write_user_file(user, self.user_tmpdir(user) / "playbook.yml", playbook)
        return Path(playbook)

    def ansible_playbook(self, playbook: PathLike, host: str = "workspace", user: str = WS_USER,  # noqa: PLR0917
                         extra_vars: Optional[Mapping] = None, check: bool = False, diff: bool = False,
                         inventory: Optional[PathLike] = None, limit: Optional[str] = None, timeout: float = 600,
                         env: Optional[Mapping[str, str]] = None, verbosity: int = 0) -> subprocess.CompletedProcess:
        """Run ansible-playbook from the venv inside ``host`` as ``user`` against the bed inventory.

        ``playbook`` is a path the user can read, or playbook text (a string with newlines).
        ``extra_vars`` go through a 0600 file owned by the user (``-e @file``), never argv.
        """
        path = self._playbook_path(playbook, user)
        argv = [str(self.venv / "bin" / "ansible-playbook"), "-i", str(inventory or self.inventory_path), str(path)]
        if check:
            argv.append("--check")
        if diff:
            argv.append("--diff")
        if limit:
            argv += ["--limit", limit]
        if verbosity:
            argv.append("-" + "v" * verbosity)
        if extra_vars is not None:
            ev = self.write_user_file(user, self.user_tmpdir(user) / "extra_vars.json", json.dumps(dict(extra_vars)))
            argv += ["-e", f"@{ev}"]
        return self.run(host, argv, user=user, env=self.ansible_env(env), timeout=timeout, cwd=path.parent)

    def playbook_json(self, playbook: PathLike, host: str = "workspace", user: str = WS_USER,  # noqa: PLR0917
                      extra_vars: Optional[Mapping] = None, check: bool = False, diff: bool = False,
                      inventory: Optional[PathLike] = None, limit: Optional[str] = None, timeout: float = 600,
                      env: Optional[Mapping[str, str]] = None) -> PlaybookResult:
        """Like :meth:`ansible_playbook` with the ``bed_json`` callback; returns the parsed document."""
        if not (self.callback_dir / "bed_json.py").exists():
            self._install_callback()
        full_env = {"ANSIBLE_STDOUT_CALLBACK": "bed_json", **(env or {})}
        cp = self.ansible_playbook(playbook, host=host, user=user, extra_vars=extra_vars, check=check, diff=diff,
                                   inventory=inventory, limit=limit, timeout=timeout, env=full_env)
        result = PlaybookResult()
        text = cp.stdout
        start = text.find("{")
        try:
            result.update(json.loads(text[start:]) if start >= 0 else {})
        except ValueError as exc:
            result["parse_error"] = str(exc)
        result.rc, result.stdout, result.stderr = cp.returncode, cp.stdout, cp.stderr
        return result

    def ansible_module(self, module: str, args: Mapping, host: str = "workspace",  # noqa: PLR0917
                       user: str = WS_USER,
                       target: str = "localhost", check: bool = False, diff: bool = False,
                       timeout: float = 600, env: Optional[Mapping[str, str]] = None) -> dict:
        """Call one module on ``target`` (an inventory host or localhost) and return its result dict.

        The call is a one-task play written to a 0600 file (arguments stay out of argv); every string
        argument is marked ``!unsafe`` so it reaches the module verbatim. The result carries ``rc``
        (ansible-playbook's exit code) and, when no result was recorded, ``failed`` with the output.
        """
        play_vars = "{ansible_python_interpreter: /usr/bin/python3}" if target == "localhost" else "{}"
        text = (f"- hosts: {json.dumps(target)}\n  gather_facts: false\n  vars: {play_vars}\n  tasks:\n"
                f"    - name: bed module call\n      {module}: {_unsafe_yaml(dict(args))}\n")
        res = self.playbook_json(text, host=host, user=user, check=check, diff=diff, timeout=timeout, env=env)
        try:
            out = dict(res.task("bed module call", target))
        except KeyError:
            out = {"failed": True, "msg": "no result recorded", "stdout": res.stdout, "stderr": res.stderr}
        out["rc"] = res.rc
        return out

    def _write_inventory(self) -> None:
        self.inventory_path.write_text(self.inventory_text())
        self.inventory_path.chmod(0o644)

    def inventory_text(self) -> str:
        lines = ["# hpc.interactive test bed inventory (tests/bed/bed inventory)", "[workspace]",
                 "workspace ansible_connection=local", "", "[cluster]",
                 f"controller ansible_host={HOSTS['controller']} ansible_user={CLUSTER_USERS[0]}", "", "[compute]"]
        lines += [f"{n} ansible_host={HOSTS[n]} ansible_user={CLUSTER_USERS[0]}" for n in COMPUTE_HOSTS]
        lines += ["", "[all:vars]", "ansible_python_interpreter=/usr/bin/python3", ""]
        return "\n".join(lines)


def _unsafe_yaml(value) -> str:
    """YAML flow text for ``value`` with every string tagged ``!unsafe`` (not templated by Ansible)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_unsafe_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_unsafe_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        return f"!unsafe {json.dumps(value)}"
    return json.dumps(value)
