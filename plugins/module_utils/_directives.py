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
        allow_directives: [requeue]       # the directive policy (below): add to the allowlist,
        deny_directives: ["mail-*"]       # take out of it,
        # allowed_directives: [comment]   # or replace it

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
    "max_cpus_per_task", "max_memory", "max_gpus", "allowed_directives", "allow_directives", "deny_directives",
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
    """A refused input; the message names the field (and, with ``use``, the typed input to use instead).

    ``render(names)`` words it with the caller's input names (``{"queue": "session_partition"}``): the session
    role passes them so a refusal names what the user typed, not this module's option.
    """

    def __init__(self, field_name: str, message: str, use: Optional[str] = None):
        self.field = field_name
        self.detail = message
        self.use = use
        super().__init__(self.render())

    def render(self, names: Optional[Mapping[str, str]] = None) -> str:
        names = names or {}
        text = "%s: %s" % (names.get(self.field) or self.field, self.detail)
        if self.use is not None:
            target = names.get(self.use, self.use)
            text += ("; use %s" % target) if target else "; the session sets it itself"
        return text


@dataclass
class SitePolicy:
    enforced_directives: List[str] = field(default_factory=list)
    max_walltime_seconds: Optional[int] = None
    allowed_queues: Optional[List[str]] = None
    max_nodes: Optional[int] = None
    max_cpus_per_task: Optional[int] = None
    max_memory_mb: Optional[int] = None
    max_gpus: Optional[int] = None
    allowed_directives: Optional[List[str]] = None  # replaces the scheduler's default allowlist
    allow_directives: List[str] = field(default_factory=list)  # added to it
    deny_directives: List[str] = field(default_factory=list)  # taken out of it
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
        allowed_directives=None if section.get("allowed_directives") is None
        else _patterns(where + ".allowed_directives", section["allowed_directives"]),
        allow_directives=_patterns(where + ".allow_directives", section.get("allow_directives")),
        deny_directives=_patterns(where + ".deny_directives", section.get("deny_directives")),
        source=path,
    )


def _patterns(where: str, value: Any) -> List[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DirectiveError("site_file", "%s must be a list of option names (e.g. comment, -m, '-l gpu*')" % where)
    return [v.strip() for v in value]


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


# ----------------------------------------------------------------------------- directive policy
# Which free-form options a user may pass (``directives``), per scheduler. An option is refused when
# - it sets what a typed input sets (TYPED: canonical key -> the module option; the message names the input to use),
# - it changes who the job runs as (IDENTITY),
# - it exports a variable that changes how programs are loaded or how the shell starts (LOADER_VARIABLES), or the
#   agent's own variables, or one that looks like a secret; or imports an environment that cannot be checked,
# - or it is not in the allowlist (ALLOWED, shell-style patterns on canonical keys; the site file's
#   ``allow_directives`` extends it, ``deny_directives`` narrows it, ``allowed_directives`` replaces it).
# Canonical keys: Slurm's long option name (``account``; short options and unique abbreviations resolved);
# PBS and SGE: the flag (``-m``), and for resource and attribute lists the flag and the name (``-l walltime``,
# ``-W group_list``).
TYPED = {
    "slurm": {"account": "account", "partition": "queue", "time": "walltime", "job-name": "job_name",
              "output": "output", "error": "error", "chdir": "workdir", "nodes": "nodes",
              "cpus-per-task": "cpus_per_task", "mem": "memory", "gpus": "gpus", "qos": "qos",
              "constraint": "constraint"},
    "pbs": {"-A": "account", "-q": "queue", "-l walltime": "walltime", "-N": "job_name", "-o": "output",
            "-e": "error", "-j": "output", "-k": "output", "-d": "workdir", "-w": "workdir", "-l nodes": "nodes",
            "-l select": "nodes", "-l ncpus": "cpus_per_task", "-l ppn": "cpus_per_task", "-l mem": "memory",
            "-l gpus": "gpus", "-l ngpus": "gpus"},
    "sge": {"-A": "account", "-P": "account", "-q": "queue", "-l h_rt": "walltime", "-l s_rt": "walltime",
            "-N": "job_name", "-o": "output", "-e": "error", "-j": "output", "-wd": "workdir", "-cwd": "workdir",
            "-l h_vmem": "memory"},
}
IDENTITY = {
    "slurm": {"uid", "gid"},
    "pbs": {"-u", "-P", "-W group_list"},
    "sge": {"-u"},
}
# Options that import an environment nobody can check here (a file, the login shell, the submitter's whole one).
UNCHECKED_ENV = {
    "slurm": {"export-file", "get-user-env"},
    "pbs": {"-V"},
    "sge": {"-V"},
}
EXPORT_KEYS = {"slurm": "export", "pbs": "-v", "sge": "-v"}
ALLOWED = {
    "slurm": [
        "comment", "mail-type", "mail-user", "nodelist", "exclude", "gres", "gres-flags", "gpus-per-node",
        "gpus-per-socket", "gpus-per-task", "cpus-per-gpu", "mem-per-cpu", "mem-per-gpu", "ntasks",
        "ntasks-per-node", "ntasks-per-core", "ntasks-per-socket", "ntasks-per-gpu", "mincpus", "sockets-per-node",
        "cores-per-socket", "threads-per-core", "hint", "distribution", "mem-bind", "cpu-freq", "gpu-freq",
        "gpu-bind", "licenses", "reservation", "exclusive", "oversubscribe", "contiguous", "switches", "tmp",
        "time-min", "begin", "deadline", "nice", "wckey", "dependency", "use-min-nodes", "spread-job",
        "no-requeue", "export",
    ],
    "pbs": ["-m", "-M", "-p", "-a", "-c", "-n", "-v", "-W depend", "-l pmem", "-l vmem", "-l pvmem", "-l file",
            "-l feature", "-l naccesspolicy", "-l place", "-l software", "-l host"],
    "sge": ["-m", "-M", "-p", "-a", "-pe", "-ar", "-R", "-binding", "-ckpt", "-c", "-hold_jid", "-js", "-notify",
            "-hard", "-soft", "-v", "-l *"],
}
WHAT = {"account": "the account", "queue": "the partition or queue", "walltime": "the walltime",
        "job_name": "the job's name", "output": "the job's output files", "error": "the job's error file",
        "workdir": "the job's directory", "nodes": "the number of nodes", "cpus_per_task": "the CPUs",
        "memory": "the memory", "gpus": "the GPUs", "qos": "the quality of service", "constraint": "node features"}
# Variables that change which code a program loads or how a shell starts, before any of the session's code runs:
# the dynamic loader's (LD_PRELOAD injects a library into every process, LD_LIBRARY_PATH/LD_AUDIT redirect it,
# GLIBC_TUNABLES reaches into the loader itself), the shells' start-up and trace hooks (BASH_ENV/ENV run a file,
# exported BASH_FUNC_* functions replace commands, SHELLOPTS/PS4 run code on every traced line, IFS re-splits),
# and the language runtimes' injection points (a module path or options list loaded before the program's own
# code: Python, Perl, Ruby, Node, Java). PATH decides which program the agent runs, and ISESSION_* are the agent's
# own inputs (its secret file, its port). A user who wants these for the server sets them in the session's own
# environment inputs (session_setup_commands), which run after the agent has started, in the job.
LOADER_VARIABLES = re.compile(
    r"^(LD_\w*|DYLD_\w*|GLIBC_TUNABLES|GCONV_PATH|LOCPATH|NLSPATH|MALLOC_\w*|HOSTALIASES|BASH_ENV|ENV|"
    r"BASH_FUNC_.*|SHELLOPTS|BASHOPTS|PS4|IFS|PATH|CDPATH|PYTHON\w*|PERL5LIB|PERL5OPT|PERLLIB|PERLIO\w*|"
    r"RUBYLIB|RUBYOPT|NODE_OPTIONS|NODE_PATH|JAVA_TOOL_OPTIONS|_JAVA_OPTIONS|JDK_JAVA_OPTIONS|CLASSPATH|"
    r"LUA_PATH\w*|LUA_CPATH\w*|TCLLIBPATH|R_PROFILE\w*|R_ENVIRON\w*|ISESSION_\w*)$", re.IGNORECASE)
SLURM_FLAGS = {"exclusive", "no-requeue", "requeue", "hold", "overcommit", "oversubscribe", "parsable", "quiet",
               "test-only", "wait", "contiguous", "spread-job", "use-min-nodes", "ignore-pbs", "no-kill",
               "get-user-env", "verbose", "reboot"}
PBS_FLAGS = {"-V", "-I", "-X", "-n", "-h", "-f", "-z", "-x"}
SGE_FLAGS = {"-notify", "-cwd", "-V", "-hard", "-soft", "-clear", "-terse", "-h"}
SGE_TWO_ARGS = {"-pe"}


@dataclass
class ParsedDirective:
    """One free-form directive as the scheduler reads it: canonical keys, and the variables it exports."""

    text: str
    keys: List[str]
    exports: Optional[List[str]] = None  # names, when the option exports variables
    export_all: bool = False  # Slurm --export: starts with ALL (the submitting environment)
    one_option: bool = True


class _Arity(Exception):
    """The words of a directive are not exactly one option and its value."""


def _one_option(field_name: str, directive: str, tokens: List[str], arity: int) -> None:
    if len(tokens) != arity:
        raise _Arity()


def parse_user_directive(scheduler: str, directive: str, field_name: str = "directives") -> ParsedDirective:
    """How ``scheduler`` will read ``directive`` (already :func:`check_directive`'d).

    ``one_option`` is False when the words are not one option and its value: the scheduler splits a directive line
    into words, so a second option in the same item would be read too.
    """
    tokens = directive.split()
    try:
        return _parse_user_directive(scheduler, directive, field_name, tokens)
    except _Arity:
        key = _parse_key_only(scheduler, tokens[0])
        return ParsedDirective(directive, [key], one_option=False)


def _parse_key_only(scheduler: str, first: str) -> str:
    if scheduler == "slurm":
        if first.startswith("--"):
            return _canon_long_slurm(first[2:].partition("=")[0])
        return _SLURM_SHORT.get(first[1:2], first[:2])
    return first[:2] if scheduler == "pbs" else first


def _parse_user_directive(scheduler: str, directive: str, field_name: str, tokens: List[str]) -> ParsedDirective:
    first = tokens[0]
    if scheduler == "slurm":
        if first.startswith("--"):
            name, sep, value = first[2:].partition("=")
            key = _canon_long_slurm(name)
            _one_option(field_name, directive, tokens, 1 if sep or key in SLURM_FLAGS else 2)
            value = value if sep else " ".join(tokens[1:])
        else:
            letter = first[1:2]
            key = _SLURM_SHORT.get(letter, "-" + letter)
            if letter in _SLURM_NO_ARG_SHORT:
                _one_option(field_name, directive, tokens if first == "-" + letter else tokens + [""], 1)
                value = ""
            else:
                _one_option(field_name, directive, tokens, 1 if len(first) > 2 else 2)
                value = first[2:] if len(first) > 2 else " ".join(tokens[1:])
        if key == "export":
            items = value.split(",")
            names = [i.split("=", 1)[0] for i in items if i not in ("ALL", "NIL", "NONE")]
            return ParsedDirective(directive, [key], names, export_all=items[0] == "ALL")
        return ParsedDirective(directive, [key])
    if scheduler == "pbs":
        flag, attached = first[:2], first[2:]
        if flag in PBS_FLAGS:
            _one_option(field_name, directive, tokens if not attached else tokens + [""], 1)
            return ParsedDirective(directive, [flag])
        _one_option(field_name, directive, tokens, 1 if attached else 2)
        value = attached or tokens[1]
        if flag in ("-l", "-W"):
            return ParsedDirective(directive, ["%s %s" % (flag, item.split("=", 1)[0].split(":", 1)[0])
                                               for item in value.split(",")])
        if flag == "-v":
            return ParsedDirective(directive, [flag], [i.split("=", 1)[0] for i in value.split(",")])
        return ParsedDirective(directive, [flag])
    if scheduler == "sge":
        flag = first
        _one_option(field_name, directive, tokens, 1 if flag in SGE_FLAGS else 3 if flag in SGE_TWO_ARGS else 2)
        if flag in ("-l",):
            return ParsedDirective(directive, ["-l " + item.split("=", 1)[0] for item in tokens[1].split(",")])
        if flag == "-v":
            return ParsedDirective(directive, [flag], [i.split("=", 1)[0] for i in tokens[1].split(",")])
        return ParsedDirective(directive, [flag])
    return ParsedDirective(directive, [first])


def _canon_long_slurm(name: str) -> str:
    from ansible_collections.hpc.interactive.plugins.module_utils._schedulers import slurm  # noqa: PLC0415

    return slurm._canon_long(name)  # pylint: disable=protected-access


def _slurm_tables():
    from ansible_collections.hpc.interactive.plugins.module_utils._schedulers import slurm  # noqa: PLC0415

    return slurm.SHORT_OPTIONS, slurm.NO_ARG_SHORT


_SLURM_SHORT, _SLURM_NO_ARG_SHORT = _slurm_tables()


def allowed_patterns(scheduler: str, policy: SitePolicy) -> List[str]:
    """The allowlist in force: the site's ``allowed_directives`` or the default, plus ``allow_directives``."""
    if policy.allowed_directives is not None:
        base = list(policy.allowed_directives)
    else:
        base = list(ALLOWED.get(scheduler, []))
    return base + list(policy.allow_directives)


def check_user_directive(scheduler: str, directive: str, policy: SitePolicy,
                         field_name: str = "directives") -> ParsedDirective:
    """Refuse a free-form directive the policy does not allow (see the tables above); the parsed form otherwise."""
    from fnmatch import fnmatchcase  # noqa: PLC0415

    parsed = parse_user_directive(scheduler, directive, field_name)
    allowed = allowed_patterns(scheduler, policy)
    for key in parsed.keys:
        typed = TYPED.get(scheduler, {}).get(key)
        if typed:
            raise DirectiveError(field_name, "%r sets %s" % (directive, WHAT.get(typed, typed)), use=typed)
        if key in IDENTITY.get(scheduler, ()):
            raise DirectiveError(field_name, "%r would change the user or group the job runs as; jobs run as the "
                                             "user who submits them" % (directive,))
        if key in UNCHECKED_ENV.get(scheduler, ()):
            raise DirectiveError(field_name, "%r imports an environment that cannot be checked; it could change how "
                                             "programs load" % (directive,))
        if any(fnmatchcase(key, pattern) for pattern in policy.deny_directives) or not any(
                fnmatchcase(key, pattern) for pattern in allowed):
            raise DirectiveError(field_name, "%r (%s) is not an option the site allows in directives; allowed: %s"
                                 % (directive, key, ", ".join(sorted(p for p in allowed
                                                                     if p not in policy.deny_directives))))
    if not parsed.one_option:
        raise DirectiveError(field_name, "%r must be one option (with its value), one per item" % (directive,))
    if parsed.exports is not None:
        for name in parsed.exports:
            if not _ENV_NAME.match(name):
                raise DirectiveError(field_name, "%r: %r is not a variable name" % (directive, name))
            if LOADER_VARIABLES.match(name):
                raise DirectiveError(field_name, "%r exports %s, which changes how programs load or start; it is not "
                                                 "allowed in directives" % (directive, name))
            if _SECRET_NAME.search(name):
                raise DirectiveError(field_name, "%r exports %s, which looks like a secret; the scheduler stores "
                                                 "directives, put secrets in a 0600 file the job reads"
                                     % (directive, name))
        if scheduler == "slurm" and not parsed.export_all:
            raise DirectiveError(field_name, "%r must start with ALL (--export=ALL,NAME=VALUE): the session's agent "
                                             "needs the environment it is submitted with" % (directive,))
    return parsed


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


# Typed options a scheduler has no plain equivalent for (its render_header refuses them): the first one set is named.
_UNSUPPORTED_ORDER = ("qos", "constraint", "reservation", "nodes", "ntasks", "cpus_per_task", "gpus")
_UNSUPPORTED_WHY = {
    "pbs": "PBS has no equivalent of this option here",
    "sge": "in Grid Engine this depends on the site's parallel environments and complexes (e.g. '-pe smp 4', "
           "'-l gpu=1')",
}


def _unsupported(scheduler: str, opts: JobOptions, exc: ValueError) -> DirectiveError:
    for name in _UNSUPPORTED_ORDER:
        value = getattr(opts, name, None)
        if value not in (None, False, 0) and not (isinstance(value, int) and value == 1 and name != "gpus"):
            if name in str(exc):
                return DirectiveError(name, "%r: %s" % (value, _UNSUPPORTED_WHY.get(scheduler, str(exc))),
                                      use="directives")
    return DirectiveError("scheduler", str(exc))


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
    try:
        typed = backend.render_header(opts)
    except ValueError as exc:
        raise _unsupported(backend.name, opts, exc) from exc
    final, removed = merge_directives(backend, typed, user, policy)
    if backend.prefix:
        # the policy applies to what the user's directives still set once the site's enforced ones won
        for directive in user:
            if directive not in removed:
                check_user_directive(backend.name, directive, policy)
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
