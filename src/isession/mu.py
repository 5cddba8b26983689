"""Import the collection's private module_utils (one implementation for modules, CLI and watcher)."""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Optional

from .collection import Collection, find_collection

PREFIX = "ansible_collections.hpc.interactive.plugins.module_utils."
_col: Optional[Collection] = None


def collection() -> Collection:
    """The collection isession drives (found once per process)."""
    global _col  # noqa: PLW0603 - one lookup per process
    if _col is None:
        _col = find_collection()
    return _col


def load(name: str) -> ModuleType:
    """``load('_state')`` -> the collection's ``plugins/module_utils/_state.py``.

    If the package is already importable (tests put a checkout on sys.path) that copy is used;
    otherwise the found collection's root is put on ``sys.path`` first.
    """
    try:
        return importlib.import_module(PREFIX + name)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("ansible_collections"):
            raise
    root = str(collection().root)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(PREFIX + name)
