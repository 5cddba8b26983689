"""Commands that report on the installation and work without the collection: ``config`` and ``collection``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict

from . import config
from .cli import EXIT_NO_COLLECTION, EXIT_OK
from .collection import candidates, find_collection
from .config import UsageError


def _print(as_json: bool, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2, default=str) if as_json else text, flush=True)


def cmd_config(args: argparse.Namespace) -> int:
    """The config file, and what a start would use (with ``--service``: for that service) and where it comes from."""
    user_config = config.load_user_config()
    try:
        inventory: Any = config.find_inventory(None, user_config=user_config)
    except UsageError as exc:
        inventory = f"(broken: {exc})"
    service = config.check_service(args.service) if args.service else None
    plan = config.start_settings(user_config, service or "", target=None, resource=None)
    doc: Dict[str, Any] = {
        "config_file": str(user_config.path), "exists": user_config.exists, "file": user_config.data,
        "session_root": str(config.session_root()), "inventory": str(inventory) if inventory else None,
        "service": service, "target": plan["target"].value, "resource": plan["resource"].value,
        "inputs": {k: s.value for k, s in plan["inputs"].items()},
        "sources": {"target": plan["target"].source, "resource": plan["resource"].source,
                    "inputs": {k: s.source for k, s in plan["inputs"].items()}},
    }
    missing = "" if user_config.exists else " (none: every setting is a default)"
    lines = [f"config file   {user_config.path}{missing}",
             f"session root  {doc['session_root']}", f"inventory     {doc['inventory'] or '(none: workspace only)'}",
             f"target        {plan['target'].value}  ({plan['target'].source})",
             f"resource      {plan['resource'].value or '-'}  ({plan['resource'].source})"]
    title = f"inputs of a {service} start" if service else "inputs of every start"
    lines.append(f"{title}:" + ("" if plan["inputs"] else " (none)"))
    lines += [f"  {k} = {json.dumps(s.value)}  ({s.source})" for k, s in plan["inputs"].items()]
    services_cfg = sorted((user_config.data.get("services") or {}).keys())
    if services_cfg and not service:
        lines.append(f"per-service settings for: {', '.join(services_cfg)} (isession config --service NAME)")
    _print(args.json, doc, "\n".join(lines))
    return EXIT_OK


def cmd_collection(args: argparse.Namespace) -> int:
    try:
        used = find_collection()
    except LookupError as exc:
        if args.json:
            _print(True, {"used": None, "error": str(exc), "found": []}, "")
        print(f"isession: {exc}", file=sys.stderr)
        return EXIT_NO_COLLECTION
    found = candidates()
    doc = {"used": {"root": str(used.root), "path": str(used.path), "version": used.version, "source": used.source},
           "found": [{"root": str(c.root), "version": c.version, "source": c.source} for c in found]}
    lines = [used.describe()] + [f"  also found: {c.describe()}" for c in found if c != used]
    _print(args.json, doc, "\n".join(lines))
    return EXIT_OK
