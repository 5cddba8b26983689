"""Make the repository importable as ``ansible_collections.hpc.interactive``.

The repository root is the collection root. Unit tests import the collection's code through
its real package name, so we keep a symlink tree in ``.cache/collections`` (git-ignored)
pointing back at the checkout, put it first on ``sys.path`` (for the modules the tests run as
scripts) and install ansible-core's collection loader with it first, as ``ansible-test units``
and the isession CLI do: every import of the collection then goes through one loader.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLLECTIONS = REPO / ".cache" / "collections"


def _ensure_collection_link() -> None:
    link = COLLECTIONS / "ansible_collections" / "hpc" / "interactive"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) == REPO:
        return
    tmp = link.with_name(f".interactive.{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(REPO)
    os.replace(tmp, link)


_ensure_collection_link()
if str(COLLECTIONS) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS))
# isession (imported in-process by the unit tests) uses this checkout, not whichever installed copy is newest
os.environ.setdefault("ISESSION_COLLECTIONS", str(COLLECTIONS))


def _install_collection_loader() -> None:
    from ansible.utils.collection_loader import AnsibleCollectionConfig  # noqa: PLC0415

    if AnsibleCollectionConfig.collection_finder is None:  # ansible-test installs its own first
        from ansible.plugins.loader import init_plugin_loader  # noqa: PLC0415

        init_plugin_loader([str(COLLECTIONS)])


_install_collection_loader()


def pytest_configure(config) -> None:
    # pyproject.toml declares these; ansible-test units runs pytest with its own ini file and --strict-markers
    for marker in ("bed: needs the network-namespace test bed (root)", "slow: takes more than a few seconds"):
        config.addinivalue_line("markers", marker)
