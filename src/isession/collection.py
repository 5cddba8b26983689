"""Which installed copy of the hpc.interactive collection isession drives, and making it importable.

isession and the collection are one product: the CLI and the watcher import the collection's module_utils by their
real names (``from ansible_collections.hpc.interactive.plugins.module_utils import _state``) and run its playbooks.
A machine can hold several copies:

* the pip package ``hpc-interactive`` ships one in site-packages as ``ansible_collections/hpc/interactive`` (the way
  the ``ansible`` package ships its collections), found through ``sys.path``;
* ``ansible-galaxy collection install`` puts one in a configured collections path (``ANSIBLE_COLLECTIONS_PATH``,
  ``collections_path`` in ansible.cfg, by default ``~/.ansible/collections:/usr/share/ansible/collections``).

The rule: ``$ISESSION_COLLECTIONS`` (collection roots, ``:``-separated; the first that holds the collection wins)
pins a copy, which is how a playbook hands its own copy to the watcher it starts. Otherwise the newest version
wins; between equal versions, the copy ansible-playbook itself would load (configured paths before ``sys.path``).

:func:`activate` installs ansible-core's collection loader with the chosen copy first, so the CLI's ordinary imports
load that copy, and :func:`isession.play.runner_env` points ansible-playbook at the same root.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

NAMESPACE, NAME = "hpc", "interactive"
FQCN = f"{NAMESPACE}.{NAME}"
PIN_VAR = "ISESSION_COLLECTIONS"
# what a user runs to get the collection (isession without it is the source tree alone, e.g. PYTHONPATH=src)
INSTALL_HINT = ("install it with `pip install hpc-interactive` (which ships it) or "
                "`ansible-galaxy collection install hpc.interactive`")


@dataclass(frozen=True)
class Collection:
    """One installed (or checked-out) copy of the collection."""

    root: Path  # the directory that holds ansible_collections/
    version: str
    source: str = "collections path"  # how it was found: $ISESSION_COLLECTIONS, collections path, Python path

    @property
    def path(self) -> Path:
        return self.root / "ansible_collections" / NAMESPACE / NAME

    def describe(self) -> str:
        return f"{FQCN} {self.version} at {self.path} ({self.source})"


def read_version(path: Path) -> Optional[str]:
    """The version of the collection at ``path`` (MANIFEST.json of a built copy, else galaxy.yml), None if none."""
    manifest = path / "MANIFEST.json"
    if manifest.is_file():
        try:
            return str(json.loads(manifest.read_text(encoding="utf-8"))["collection_info"]["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    galaxy = path / "galaxy.yml"
    if galaxy.is_file():
        try:
            lines = galaxy.read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("version:"):
                return line.split(":", 1)[1].split("#", 1)[0].strip().strip("'\"") or None
    return None


def version_key(version: str) -> Tuple[int, Tuple]:
    """Sort key for collection versions (semantic versions; anything unparsable sorts first)."""
    from packaging.version import InvalidVersion, Version  # noqa: PLC0415 - ansible-core's own dependency

    try:
        return (1, (Version(version),))
    except InvalidVersion:
        return (0, (version,))


def ansible_search_path() -> Tuple[List[str], bool]:
    """ansible-core's configured collections paths and whether it also scans ``sys.path`` (its own settings)."""
    from ansible import constants as C  # noqa: PLC0415, N812 - ansible's config (ansible.cfg, env), read once

    return [os.path.expanduser(p) for p in C.COLLECTIONS_PATHS], bool(C.COLLECTIONS_SCAN_SYS_PATH)


def _unique(paths: Iterable[Path]) -> List[Path]:
    out: List[Path] = []
    for path in paths:
        root = path.parent if path.name == "ansible_collections" else path
        if root not in out:
            out.append(root)
    return out


def candidates(env: Optional[Mapping[str, str]] = None, configured: Optional[Sequence[str]] = None,
               scan_sys_path: bool = True, sys_path: Optional[Sequence[str]] = None) -> List[Collection]:
    """Every copy found, in ansible-playbook's search order (configured paths, then ``sys.path``).

    With ``$ISESSION_COLLECTIONS`` set, only the roots it names are searched (in its order).
    ``configured``/``scan_sys_path`` default to ansible-core's settings.
    """
    env = os.environ if env is None else env
    pinned = [Path(p) for p in env.get(PIN_VAR, "").split(os.pathsep) if p]
    if pinned:
        where: List[Tuple[Path, str]] = [(p, f"${PIN_VAR}") for p in _unique(pinned)]
    else:
        if configured is None:
            configured, scan_sys_path = ansible_search_path()
        where = [(p, "collections path") for p in _unique(Path(c) for c in configured)]
        if scan_sys_path:
            seen = {p for p, _ignored in where}
            where += [(p, "Python path") for p in _unique(Path(s) for s in (sys.path if sys_path is None else sys_path)
                                                          if s) if p not in seen]
    found = []
    for root, source in where:
        path = root / "ansible_collections" / NAMESPACE / NAME
        version = read_version(path) if path.is_dir() else None
        if version:
            found.append(Collection(root=root, version=version, source=source))
    return found


def choose(found: Sequence[Collection], pinned: bool = False) -> Collection:
    """The copy to use: the first when pinned, else the newest (the earliest of equal versions)."""
    if not found:
        raise LookupError("no copy found")
    if pinned:
        return found[0]
    best = found[0]
    for col in found[1:]:
        if version_key(col.version) > version_key(best.version):
            best = col
    return best


def find_collection(env: Optional[Mapping[str, str]] = None, configured: Optional[Sequence[str]] = None,
                    scan_sys_path: bool = True, sys_path: Optional[Sequence[str]] = None) -> Collection:
    """The copy isession uses, or LookupError naming where it looked and how to install one."""
    env = os.environ if env is None else env
    found = candidates(env, configured, scan_sys_path, sys_path)
    if found:
        return choose(found, pinned=bool(env.get(PIN_VAR)))
    if env.get(PIN_VAR):
        where = f"${PIN_VAR}={env[PIN_VAR]}"
    else:
        roots = list(configured) if configured is not None else ansible_search_path()[0]
        where = "the collections paths " + ":".join(roots) + " and the Python path"
    raise LookupError(f"the {FQCN} collection is not installed (looked in {where}); {INSTALL_HINT}")


_active: Optional[Collection] = None


def activate(col: Optional[Collection] = None, plugins: bool = True) -> Collection:
    """Make ``import ansible_collections.hpc.interactive...`` load ``col`` (default: :func:`find_collection`).

    Installs ansible-core's collection loader (``init_plugin_loader``, the entry point its own CLIs use) with the
    chosen root in front of the configured paths. Once per process; when a loader is already installed (inside
    ansible-test or an Ansible worker) that one is kept and must already resolve the collection.

    ``plugins=False`` is for a command that runs no Ansible plugin in its own process (``isession start`` and
    ``isession cancel``: their playbooks are ansible-playbook processes): ``col`` alone is made importable, as a plain
    namespace package (:func:`_install_plain`; ansible-core's collection finder for it alone when
    ``ansible_collections`` is imported already), without Ansible's plugin loaders, and without its configuration
    when ``col`` is given or pinned (finding a copy reads the configured collections paths). That is ~0.17 s of CPU
    less per command: time in front of every start, and in twenty cancels started at once on the cores that also run
    the sessions.
    """
    global _active  # noqa: PLW0603 - one loader per process
    if _active is not None:
        return _active
    col = col or find_collection()
    if not plugins and "ansible.utils.collection_loader" not in sys.modules and _install_plain(col):
        # no collection finder can be installed without that module: the plain package is all (not even its import)
        _active = col
        return col
    from ansible.utils.collection_loader import AnsibleCollectionConfig  # noqa: PLC0415

    if AnsibleCollectionConfig.collection_finder is None:
        if plugins:
            from ansible.plugins.loader import init_plugin_loader  # noqa: PLC0415

            init_plugin_loader([str(col.root)])
        elif not _install_plain(col):
            # the finder init_plugin_loader installs (ansible-core >= 2.10 keeps this signature), fed one root
            from ansible.utils.collection_loader._collection_finder import (  # noqa: PLC0415
                _AnsibleCollectionFinder,
            )

            _AnsibleCollectionFinder(paths=[str(col.root)], scan_sys_paths=False)._install()
    _active = col
    return col


def _install_plain(col: Collection) -> bool:
    """Make ``ansible_collections`` a plain namespace package of ``col``'s root, for a command that only imports the
    collection's module_utils (``activate(plugins=False)``); False when ``ansible_collections`` is imported already.

    Python's own import system then loads ``ansible_collections.hpc.interactive.plugins.module_utils._x`` from that
    copy, with its bytecode in the copy or, where the copy has none and is not writable, in the user's cache
    (:func:`bytecode_prefix`). ansible-core's collection finder does the same for
    these imports, but it is ~15 ms of CPU more per command: its import, the YAML parser it loads to read the
    collection's ``meta/runtime.yml`` (plugin routing, which no module_util import uses), and a compile of every
    module from source at every run. Twenty cancels at once pay that on the cores the sessions run on.
    """
    if "ansible_collections" in sys.modules:
        return False
    import importlib.machinery  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415

    spec = importlib.machinery.ModuleSpec("ansible_collections", None, is_package=True)
    spec.submodule_search_locations = [str(col.root / "ansible_collections")]
    sys.modules["ansible_collections"] = importlib.util.module_from_spec(spec)
    prefix = bytecode_prefix(col.path / "plugins" / "module_utils")
    if prefix:
        sys.pycache_prefix = prefix
    return True


def bytecode_prefix(module_utils: Path, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Where this process should keep compiled modules (``sys.pycache_prefix``) so that the copy's module_utils are
    not compiled from source at every command: ``${XDG_CACHE_HOME:-~/.cache}/isession/pycache`` when the copy has no
    ``__pycache__`` and the user cannot write one (a system-wide ``ansible-galaxy collection install``, which does not
    compile); None when Python caches them there itself (a copy of the user's, a pip install, which compiles), when
    writing bytecode is turned off, when a prefix is set already (``$PYTHONPYCACHEPREFIX``), or when that cache cannot
    be written (the modules imported later would then be compiled too, instead of read from their own bytecode).

    The prefix applies to every module the process imports from then on: those are compiled into it once, then read
    from it.
    """
    env = os.environ if env is None else env
    if sys.pycache_prefix is not None or sys.dont_write_bytecode or (module_utils / "__pycache__").is_dir() \
            or os.access(module_utils, os.W_OK) or not module_utils.is_dir():
        return None
    home = Path(env.get("HOME") or Path.home())
    prefix = (Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else home / ".cache") / "isession" / "pycache"
    try:  # a cache that cannot be written would only cost more: the modules imported later have bytecode of their own
        prefix.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    return str(prefix) if os.access(prefix, os.W_OK) else None


def recorded_copy(record: Mapping[str, object], env: Optional[Mapping[str, str]] = None) -> Optional[Collection]:
    """The copy a session's start ran (its CLI record's ``collection`` root), found without Ansible's configuration.

    ``$ISESSION_COLLECTIONS`` still wins (it needs no configuration either). None when the record names no copy or
    the copy is gone: the caller then finds one the usual way.
    """
    env = os.environ if env is None else env
    if env.get(PIN_VAR):
        found = candidates(env)
        return found[0] if found else None
    root = record.get("collection")
    if not isinstance(root, str) or not root:
        return None
    version = read_version(Path(root) / "ansible_collections" / NAMESPACE / NAME)
    return Collection(root=Path(root), version=version, source="the session's start") if version else None


def active() -> Optional[Collection]:
    """The copy :func:`activate` chose in this process (None before)."""
    return _active


def version_report(env: Optional[Mapping[str, str]] = None) -> str:
    """What ``isession --version`` prints after its own version: the copy used, the others found, ansible-core."""
    try:
        from ansible.release import __version__ as ansible_version  # noqa: PLC0415
    except ImportError:  # pragma: no cover - ansible-core is a dependency
        ansible_version = "not installed"
    lines = []
    try:
        used = find_collection(env)
    except LookupError as exc:
        lines.append(f"collection: {exc}")
    else:
        lines.append(f"collection: {used.describe()}")
        others = [c for c in candidates(env) if c != used]
        lines += [f"  also found: {c.describe()}" for c in others]
    lines.append(f"ansible-core {ansible_version}")
    return "\n".join(lines)
