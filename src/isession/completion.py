"""Shell completion (argcomplete): services, session ids, resources and input names.

Enable it once per shell with ``eval "$(register-python-argcomplete isession)"`` (or argcomplete's global
completion: ``isession``'s entry module carries the ``PYTHON_ARGCOMPLETE_OK`` marker). Each completer is called only
while completing and never raises: a completion that cannot be computed offers nothing.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, List


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer a completion request (the shell sets ``_ARGCOMPLETE``) and exit; otherwise return at once."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete  # noqa: PLC0415 - only while completing

    argcomplete.autocomplete(parser)


def _safe(func: Callable[..., List[str]]) -> Callable[..., List[str]]:
    def wrapped(prefix: str = "", parsed_args: Any = None, **_kwargs: Any) -> List[str]:
        try:
            return [c for c in func(parsed_args) if c.startswith(prefix)]
        except Exception:  # noqa: BLE001 - completion must never break the shell
            return []

    wrapped.__name__ = func.__name__
    wrapped.__doc__ = func.__doc__
    return wrapped


def files(prefix: str = "", **kwargs: Any) -> List[str]:
    """File names, as the shell completes them."""
    from argcomplete.completers import FilesCompleter  # noqa: PLC0415

    return list(FilesCompleter()(prefix, **kwargs))


@_safe
def services(_args: Any) -> List[str]:
    """Services of the collection isession uses (its start playbooks)."""
    from .collection import find_collection  # noqa: PLC0415
    from .describe import services as names  # noqa: PLC0415

    return names(find_collection().path)


@_safe
def sessions(_args: Any) -> List[str]:
    """Session ids under the session root, newest first."""
    from .config import session_root  # noqa: PLC0415

    root = session_root()
    dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return [d.name for d in sorted(dirs, key=lambda d: d.stat().st_mtime, reverse=True)]


@_safe
def resources(args: Any) -> List[str]:
    """Hosts of the inventory that describe a resource (``isession_scheduler``, or the group ``cluster``)."""
    from .config import find_inventory, load_user_config  # noqa: PLC0415
    from .doctor import resources as names  # noqa: PLC0415

    inventory = find_inventory(getattr(args, "inventory", None), user_config=load_user_config())
    return names(inventory) if inventory else []


@_safe
def inputs(args: Any) -> List[str]:
    """``NAME=`` for every input of the service named on the command line."""
    from .collection import find_collection  # noqa: PLC0415
    from .describe import describe  # noqa: PLC0415

    info = describe(find_collection().path, args.service)
    return [f"{row['name']}=" for key in ("service_inputs", "session_inputs") for row in info[key]]
