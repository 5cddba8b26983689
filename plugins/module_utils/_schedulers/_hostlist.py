# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Expand Slurm-style host lists (``compute[1-3,7],gpu01``) and PBS ``exec_host`` strings."""
from __future__ import annotations

import re
from typing import List

_RANGE = re.compile(r"^([^\[\],]*)\[([^\]]+)\](.*)$")


def _split_top(text: str) -> List[str]:
    parts, depth, cur = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += char
    if cur:
        parts.append(cur)
    return parts


def expand(hostlist: str) -> List[str]:
    """``a[1-2],b`` -> ``['a1', 'a2', 'b']``; empty, ``(null)`` and ``None`` -> ``[]``."""
    text = (hostlist or "").strip()
    if not text or text in ("(null)", "None", "--"):
        return []
    out: List[str] = []
    for part in _split_top(text):
        match = _RANGE.match(part)
        if not match:
            out.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for rng in ranges.split(","):
            lo, _sep, hi = rng.partition("-")
            width = len(lo)
            for num in range(int(lo), int(hi or lo) + 1):
                for tail in expand(suffix) if "[" in suffix else [suffix]:
                    out.append("%s%0*d%s" % (prefix, width, num, tail))
    return out


def exec_hosts(value: str) -> List[str]:
    """PBS ``exec_host`` (``n1/0*2+n2/1`` or ``n1/0-3``) -> unique host names in order."""
    seen: List[str] = []
    for part in (value or "").split("+"):
        host = part.strip().split("/")[0].split(":")[0]
        if host and host not in seen and host != "--":
            seen.append(host)
    return seen
