"""Find the hpc.interactive collection that isession drives."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

NAMESPACE, NAME = "hpc", "interactive"


@dataclass(frozen=True)
class Collection:
    """An installed (or checked-out) copy of the collection."""

    root: Path  # the directory that holds ansible_collections/
    version: str

    @property
    def path(self) -> Path:
        return self.root / "ansible_collections" / NAMESPACE / NAME


def search_roots(env: dict[str, str] | None = None, prefix: str | None = None) -> list[Path]:
    """Where to look, first match wins: $ISESSION_COLLECTIONS, the venv (``prefix``), Ansible's own paths."""
    env = dict(os.environ if env is None else env)
    roots: list[Path] = []
    for var in ("ISESSION_COLLECTIONS", "ANSIBLE_COLLECTIONS_PATH", "ANSIBLE_COLLECTIONS_PATHS"):
        roots += [Path(p) for p in env.get(var, "").split(os.pathsep) if p]
    roots.append(Path(sys.prefix if prefix is None else prefix) / "collections")
    home = Path(env.get("HOME") or Path.home())
    roots += [home / ".ansible" / "collections", Path("/usr/share/ansible/collections")]
    seen: set[Path] = set()
    out = []
    for r in roots:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def _version(path: Path) -> str | None:
    manifest = path / "MANIFEST.json"
    if manifest.is_file():
        try:
            return str(json.loads(manifest.read_text())["collection_info"]["version"])
        except (ValueError, KeyError, TypeError):
            return None
    galaxy = path / "galaxy.yml"
    if galaxy.is_file():
        for line in galaxy.read_text().splitlines():
            if line.startswith("version:"):
                return line.split(":", 1)[1].strip().strip("'\"")
    return None


def find_collection(env: dict[str, str] | None = None, prefix: str | None = None) -> Collection:
    """The first usable copy of hpc.interactive, or LookupError listing where we looked."""
    roots = search_roots(env, prefix)
    for root in roots:
        path = root / "ansible_collections" / NAMESPACE / NAME
        version = _version(path)
        if version:
            return Collection(root=root, version=version)
    where = ", ".join(str(r) for r in roots)
    raise LookupError(f"the hpc.interactive collection is not installed (looked in: {where}); run scripts/setup")
