"""``isession describe SERVICE``: the inputs a start takes, from the roles' ``meta/argument_specs.yml``."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

SHARED_ROLE, SHARED_ENTRY = "session", "start"

# Ansible's documentation markup (https://docs.ansible.com "Linking and other format macros"): the
# argument specs use it because ansible-doc renders it; a terminal gets plain text. Two-argument
# macros keep their text and the target in brackets; E() and P() keep their argument.
_MARKUP_2 = re.compile(r"\b[L]\(([^()]*),\s*([^()]*)\)")
_MARKUP_1 = re.compile(r"\b([ICBMUVOREP])\(((?:[^()]|\([^()]*\))*)\)")
_HRULE = re.compile(r"\bHORIZONTALLINE\b")
_QUOTED = {"C": "`{}`", "V": "`{}`", "O": "`{}`", "RV": "`{}`", "E": "`{}`", "I": "{}", "B": "{}", "M": "{}",
           "U": "{}", "P": "{}", "R": "{}"}


def plain(text: str) -> str:
    """Ansible doc markup -> plain text: ``C(x)``/``V(x)``/``O(x)`` -> `x`, ``I(x)``/``B(x)`` -> x, ...

    ``O(name=value)`` keeps both parts; ``V("")`` becomes `""`; ``L(text, url)`` becomes ``text <url>``.
    """
    text = _MARKUP_2.sub(lambda m: f"{m.group(1).strip()} <{m.group(2).strip()}>", text)
    text = re.sub(r"\bRV\(((?:[^()]|\([^()]*\))*)\)", lambda m: f"`{m.group(1)}`", text)
    text = _MARKUP_1.sub(lambda m: _QUOTED[m.group(1)].format(m.group(2)), text)
    return _HRULE.sub("", text)


def services(col_path: Path) -> List[str]:
    """Services that have a start playbook."""
    return sorted(p.stem[len("start_"):] for p in (col_path / "playbooks").glob("start_*.yml"))


def load_spec(col_path: Path, role: str, entry: str) -> Optional[Dict[str, Any]]:
    path = col_path / "roles" / role / "meta" / "argument_specs.yml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return (data.get("argument_specs") or {}).get(entry)


def options(spec: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Flatten a spec's options into rows: name, type, required, default, choices, description."""
    rows = []
    for name, opt in sorted(((spec or {}).get("options") or {}).items()):
        desc = opt.get("description", "")
        if isinstance(desc, list):
            desc = " ".join(str(d) for d in desc)
        rows.append({"name": name, "type": opt.get("type", "str"), "elements": opt.get("elements"),
                     "required": bool(opt.get("required", False)), "default": opt.get("default"),
                     "choices": opt.get("choices"), "description": plain(" ".join(str(desc).split()))})
    return rows


def describe(col_path: Path, service: str) -> Dict[str, Any]:
    """``{"service", "description", "service_inputs", "session_inputs"}``; LookupError for an unknown service."""
    if not (col_path / "playbooks" / f"start_{service}.yml").is_file():
        known = ", ".join(services(col_path)) or "none yet"
        raise LookupError(f"no service {service!r} (services: {known})")
    svc = load_spec(col_path, service, "main")
    shared = load_spec(col_path, SHARED_ROLE, SHARED_ENTRY)
    return {"service": service,
            "description": plain(" ".join(str((svc or {}).get("short_description") or "").split())),
            "service_inputs": options(svc), "session_inputs": options(shared)}


def _fmt_default(value: Any) -> str:
    if value is None:
        return ""
    if value in ("", [], {}):
        return f"default {value!r}"
    return f"default {value}"


def format_text(info: Dict[str, Any]) -> str:
    lines = [f"{info['service']}: {info['description']}".rstrip(": ")]
    for title, key in (("Service inputs", "service_inputs"), ("Session inputs (shared by every service)",
                                                              "session_inputs")):
        lines += ["", f"{title}:"]
        if not info[key]:
            lines.append("  (none)")
        for row in info[key]:
            kind = row["type"] + (f" of {row['elements']}" if row.get("elements") else "")
            bits = [kind, "required" if row["required"] else _fmt_default(row["default"])]
            if row["choices"]:
                bits.append("choices: " + ", ".join(str(c) for c in row["choices"]))
            lines.append(f"  {row['name']} ({'; '.join(b for b in bits if b)})")
            if row["description"]:
                lines.append(f"      {row['description']}")
    lines += ["", "Give inputs with -e name=value (repeatable) or --inputs FILE.yml."]
    return "\n".join(lines)
