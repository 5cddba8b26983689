# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Validate job options and free-form directives, apply the site policy, render the batch script.

Private to the hpc.interactive collection. Standard library only (PyYAML used when importable).

Rules (refusals raise :class:`DirectiveError` naming the field; nothing is written or submitted):
- names (job_name, queue, account, qos, reservation): ``[A-Za-z0-9_]`` first, then ``[A-Za-z0-9_.+@-]``.
- paths (workdir, output, error, script_path): no whitespace, quotes, ``$ ` ; | & < > \\``, no
  control characters, no leading ``-``; Slurm/PBS ``%j``-style patterns are allowed.
- free-form directives: one line, no leading whitespace, start with ``-``, none of
  ``$ ` ; | & < > \\ ' "`` and no control characters.
- environment: names ``[A-Za-z_][A-Za-z0-9_]*``; names that look like secrets
  (TOKEN, PASSWORD, PASSWD, SECRET, API_KEY, PRIVATE_KEY, CREDENTIAL) are refused: the rendered
  script is stored by the scheduler, so secrets go in 0600 files the job reads. Values are
  single-line and shell-quoted with ``shlex.quote``.

Site policy: a root-owned file (default ``/etc/isession/site.yml``; not a module option) that is
not group/world writable, in a root-owned directory that is not group/world writable. A file that
exists but fails these checks is *refused* (the submit fails): silently running without the
site's limits is worse than a clear error. A missing file means no policy. Schema::

    schedulers:
      slurm:                              # or pbs, sge, local
        enforced_directives: ["--comment=site", "--qos=normal"]
        max_walltime: "04:00:00"          # same syntax as the walltime option
        allowed_queues: [debug, small]    # alias: allowed_partitions
        max_nodes: 2
        max_cpus_per_task: 16
        max_memory: 64G
        max_gpus: 4

Enforced directives replace every user directive (typed or free-form) for the same option and are
rendered last (sbatch and qsub keep the last occurrence). Limits are checked on the *effective*
directives, so a free-form ``--time`` cannot slip past ``max_walltime``.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._base import Backend, JobOptions

DEFAULT_SITE_FILE = "/etc/isession/site.yml"
SITE_KEYS = (
    "enforced_directives", "max_walltime", "allowed_queues", "allowed_partitions", "max_nodes",
    "max_cpus_per_task", "max_memory", "max_gpus",
)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+@-]{0,127}$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
_PATH = re.compile(r"^[A-Za-z0-9_./%+@=:,~-]{1,4096}$")
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:&|\[\]*()!-]{1,512}$")
JOB_ID = re.compile(r"^[0-9][A-Za-z0-9_.\[\]-]{0,127}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_SECRET_NAME = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|PRIVATE_?KEY|CREDENTIAL)", re.IGNORECASE)
_DIRECTIVE_BAD = re.compile(r"[$`;|&<>\\'\"\x00-\x1f\x7f]")
_MEMORY = re.compile(r"^(\d+)\s*([KMGT]?)(?:I?B)?$", re.IGNORECASE)
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class DirectiveError(ValueError):
    """A refused input; the message names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__("%s: %s" % (field_name, message))
        self.field = field_name


@dataclass
class SitePolicy:
    enforced_directives: List[str] = field(default_factory=list)
    max_walltime_seconds: Optional[int] = None
    allowed_queues: Optional[List[str]] = None
    max_nodes: Optional[int] = None
    max_cpus_per_task: Optional[int] = None
    max_memory_mb: Optional[int] = None
    max_gpus: Optional[int] = None
    source: str = ""


@dataclass
class Rendered:
    text: str
    directives: List[str]
    enforced: List[str]
    removed: List[str]


# ----------------------------------------------------------------------------- validation
def check_name(field_name: str, value: Optional[str], job_name: bool = False) -> Optional[str]:
    if value is None:
        return None
    value = str(value)
    pattern = _JOB_NAME if job_name else _NAME
    if not pattern.match(value):
        raise DirectiveError(
            field_name, "%r is not allowed (letters, digits, '_' first, then letters, digits, '_.+-'%s)"
            % (value, "" if job_name else "@"))
    return value


def check_path(field_name: str, value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    value = str(value)
    if value.startswith("-") or not _PATH.match(value) or "/-" in value:
        raise DirectiveError(
            field_name, "%r is not an allowed path (no whitespace, quotes, shell metacharacters, control "
            "characters or components starting with '-')" % (value,))
    return value


def parse_walltime(field_name: str, value: Any) -> Optional[int]:
    """Minutes (int or digits), ``HH:MM:SS``, ``D-HH[:MM[:SS]]`` -> seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise DirectiveError(field_name, "must be minutes or HH:MM:SS or D-HH:MM:SS")
    if isinstance(value, int):
        seconds = value * 60
    else:
        text = str(value).strip()
        match = _WALLTIME.match(text)
        if not match:
            raise DirectiveError(field_name, "%r must be minutes, HH:MM:SS or D-HH:MM:SS" % (value,))
        days, first, second, third = match.groups()
        if days is None and second is None:
            seconds = int(first) * 60  # plain minutes
        elif days is None and third is None:
            raise DirectiveError(field_name, "%r is ambiguous (HH:MM or MM:SS?); write HH:MM:SS" % (value,))
        else:
            hours = int(first)
            minutes = int(second or 0)
            secs = int(third or 0)
            if (second is not None and minutes > 59) or secs > 59:
                raise DirectiveError(field_name, "%r has minutes or seconds above 59" % (value,))
            seconds = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds <= 0:
        raise DirectiveError(field_name, "must be positive")
    return seconds


def parse_memory(field_name: str, value: Any) -> Optional[int]:
    """``4G``, ``512M``, ``1024`` (MiB), ``2GB`` -> MiB."""
    if value is None or value == "":
        return None
    match = _MEMORY.match(str(value).strip())
    if not match or isinstance(value, bool):
        raise DirectiveError(field_name, "%r must be a size like 512M, 4G or 1T" % (value,))
    number, unit = int(match.group(1)), match.group(2).upper()
    factor = {"K": 1.0 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    mib = int(number * factor) if unit != "K" else max(1, (number + 1023) // 1024)
    if mib <= 0:
        raise DirectiveError(field_name, "must be positive")
    return mib


def check_count(field_name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DirectiveError(field_name, "must be a positive integer")
    return value


def check_directive(field_name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise DirectiveError(field_name, "each directive must be a string")
    if not value or value != value.strip() or not value.startswith("-"):
        raise DirectiveError(field_name, "%r must be one option starting with '-' (no surrounding spaces)" % (value,))
    if _DIRECTIVE_BAD.search(value):
        raise DirectiveError(
            field_name, "%r contains a newline, control character, quote or one of $ ` ; | & < > \\" % (value,))
    return value


def check_environment(field_name: str, env: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for key, val in (env or {}).items():
        if not _ENV_NAME.match(str(key)):
            raise DirectiveError(field_name, "variable name %r is not allowed" % (key,))
        if _SECRET_NAME.search(str(key)):
            raise DirectiveError(
                field_name, "variable %r looks like a secret; the scheduler stores the script, put secrets in a "
                "0600 file the job reads" % (key,))
        text = "" if val is None else str(val)
        if isinstance(val, (dict, list)) or any(c in text for c in "\n\r\x00"):
            raise DirectiveError(field_name, "value of %r must be a single-line string" % (key,))
        out[str(key)] = text
    return out


def normalise_options(params: Mapping[str, Any]) -> JobOptions:
    """Module parameters -> validated :class:`JobOptions` (raises :class:`DirectiveError`)."""
    constraint = params.get("constraint")
    if constraint is not None and not _CONSTRAINT.match(str(constraint)):
        raise DirectiveError("constraint", "%r is not an allowed feature expression" % (constraint,))
    return JobOptions(
        job_name=check_name("job_name", params.get("job_name"), job_name=True),
        workdir=check_path("workdir", params.get("workdir")),
        output=check_path("output", params.get("output")),
        error=check_path("error", params.get("error")),
        queue=check_name("queue", params.get("queue")),
        walltime_seconds=parse_walltime("walltime", params.get("walltime")),
        nodes=check_count("nodes", params.get("nodes")),
        ntasks=check_count("ntasks", params.get("ntasks")),
        cpus_per_task=check_count("cpus_per_task", params.get("cpus_per_task")),
        memory_mb=parse_memory("memory", params.get("memory")),
        gpus=check_count("gpus", params.get("gpus")),
        account=check_name("account", params.get("account")),
        qos=check_name("qos", params.get("qos")),
        constraint=None if constraint is None else str(constraint),
        exclusive=bool(params.get("exclusive")),
        reservation=check_name("reservation", params.get("reservation")),
    )


# ----------------------------------------------------------------------------- site policy
def _parse_site_text(text: str) -> Any:
    try:
        import yaml  # noqa: PLC0415 - optional dependency
    except ImportError:
        return json.loads(text)
    return yaml.safe_load(text)


def _check_owner(path: str, required_uid: int) -> None:
    for target in (path, os.path.dirname(os.path.abspath(path))):
        st = os.stat(target)
        if st.st_uid != required_uid or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise DirectiveError(
                "site_file", "%s must be owned by uid %d and not group/world writable; refusing to submit "
                "with an untrusted site policy" % (target, required_uid))


def load_site_policy(scheduler: str, path: str = DEFAULT_SITE_FILE, required_uid: int = 0) -> SitePolicy:
    """Read the policy for ``scheduler``; missing file -> empty policy; untrusted or bad file -> error."""
    if not os.path.lexists(path):
        return SitePolicy()
    _check_owner(path, required_uid)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = _parse_site_text(text) or {}
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError (a ValueError? no) handled below
        raise DirectiveError("site_file", "%s cannot be parsed: %s" % (path, exc)) from exc
    except Exception as exc:  # noqa: BLE001 - yaml errors are not ValueError
        raise DirectiveError("site_file", "%s cannot be parsed: %s" % (path, exc)) from exc
    if not isinstance(data, dict) or not isinstance(data.get("schedulers", {}), dict):
        raise DirectiveError("site_file", "%s must be a mapping with a 'schedulers' mapping" % path)
    section = data.get("schedulers", {}).get(scheduler) or {}
    if not isinstance(section, dict):
        raise DirectiveError("site_file", "%s: schedulers.%s must be a mapping" % (path, scheduler))
    unknown = sorted(set(section) - set(SITE_KEYS))
    if unknown:
        raise DirectiveError("site_file", "%s: unknown keys in schedulers.%s: %s" % (path, scheduler, unknown))
    where = "site_file schedulers.%s" % scheduler
    enforced = [check_directive(where + ".enforced_directives", d) for d in section.get("enforced_directives") or []]
    queues = section.get("allowed_queues", section.get("allowed_partitions"))
    return SitePolicy(
        enforced_directives=enforced,
        max_walltime_seconds=parse_walltime(where + ".max_walltime", section.get("max_walltime")),
        allowed_queues=None if queues is None else [str(q) for q in queues],
        max_nodes=check_count(where + ".max_nodes", section.get("max_nodes")),
        max_cpus_per_task=check_count(where + ".max_cpus_per_task", section.get("max_cpus_per_task")),
        max_memory_mb=parse_memory(where + ".max_memory", section.get("max_memory")),
        max_gpus=check_count(where + ".max_gpus", section.get("max_gpus")),
        source=path,
    )


def _check_limits(effective: Mapping[str, str], policy: SitePolicy) -> None:
    """Limits on the values the scheduler will see (``effective``: canonical key -> last value)."""
    if policy.max_walltime_seconds is not None and effective.get("time"):
        asked = parse_walltime("walltime", effective["time"])
        if asked is not None and asked > policy.max_walltime_seconds:
            raise DirectiveError("walltime", "%s is above the site's max_walltime (%d minutes)"
                                 % (effective["time"], policy.max_walltime_seconds // 60))
    if policy.allowed_queues is not None and effective.get("queue"):
        for queue in effective["queue"].split(","):
            if queue.split("@")[0] not in policy.allowed_queues:
                raise DirectiveError("queue", "%r is not one of the site's allowed queues %s"
                                     % (queue, policy.allowed_queues))
    for key, limit, label in (("nodes", policy.max_nodes, "max_nodes"),
                              ("cpus_per_task", policy.max_cpus_per_task, "max_cpus_per_task"),
                              ("gpus", policy.max_gpus, "max_gpus")):
        value = effective.get(key)
        if limit is not None and value:
            number = re.match(r"\d+", value.split("-")[-1].split(":")[-1])
            if number and int(number.group(0)) > limit:
                raise DirectiveError(key, "%s is above the site's %s (%d)" % (value, label, limit))
    if policy.max_memory_mb is not None and effective.get("memory"):
        asked_mb = parse_memory("memory", effective["memory"])
        if asked_mb is not None and asked_mb > policy.max_memory_mb:
            raise DirectiveError("memory", "%s is above the site's max_memory (%d MiB)"
                                 % (effective["memory"], policy.max_memory_mb))


# ----------------------------------------------------------------------------- rendering
def merge_directives(backend: Backend, typed: Sequence[str], user: Sequence[str], policy: SitePolicy):
    """(final directives, removed user directives): user ones overridden by enforced ones are dropped."""
    enforced_keys = [k for d in policy.enforced_directives for k in backend.directive_keys(d)]
    kept: List[str] = []
    removed: List[str] = []
    for directive in list(typed) + list(user):
        keys = backend.directive_keys(directive)
        if any(backend.conflicts(k, e) for k in keys for e in enforced_keys):
            removed.append(directive)
        else:
            kept.append(directive)
    return kept + list(policy.enforced_directives), removed


def render_script(
    backend: Backend,
    opts: JobOptions,
    body: str,
    *,
    directives: Sequence[str] = (),
    environment: Optional[Mapping[str, str]] = None,
    policy: Optional[SitePolicy] = None,
) -> Rendered:
    """The batch script text: shebang, directive block (enforced last), exports, the user's body."""
    policy = policy or SitePolicy()
    user = [check_directive("directives", d) for d in directives]
    typed = backend.render_header(opts)
    final, removed = merge_directives(backend, typed, user, policy)
    _check_limits(backend.effective_values(final), policy)
    if "\x00" in body:
        raise DirectiveError("script", "contains a NUL byte")
    lines = body.splitlines()
    shebang = "#!/bin/bash"
    if lines and lines[0].startswith("#!"):
        shebang, lines = lines[0], lines[1:]
    out = [shebang]
    if backend.prefix:
        out.extend("%s %s" % (backend.prefix, d) for d in final)
    out.append("# rendered by hpc.interactive.scheduler_submit")
    if backend.cd_in_body and opts.workdir:
        out.append("cd -- %s || exit 1" % shlex.quote(opts.workdir))
    for key, val in sorted(check_environment("environment", environment).items()):
        out.append("export %s=%s" % (key, shlex.quote(val)))
    out.extend(lines)
    return Rendered("\n".join(out) + "\n", final, list(policy.enforced_directives), removed)
