"""The isession command line."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .collection import find_collection


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isession", description="Interactive sessions on HPC resources.")
    parser.add_argument("--version", action="version", version=f"isession {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("collection", help="show which hpc.interactive collection isession uses")
    return parser


def cmd_collection() -> int:
    try:
        col = find_collection()
    except LookupError as exc:
        print(f"isession: {exc}", file=sys.stderr)
        return 1
    print(f"hpc.interactive {col.version} at {col.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "collection":
        return cmd_collection()
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
