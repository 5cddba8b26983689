# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The watcher's server on a resource: answers JSON requests about many jobs over one ssh session.

Private to the hpc.interactive collection. The user's watcher (``isession.watcher``) polls every resource once a
second. One Ansible module run per poll would cost a second or two of CPU on the workspace (interpreter start,
inventory, AnsiballZ, a Python start on the controller), so the watcher keeps ONE ``ssh`` session per resource
running ``python3 -c BOOT`` on the controller instead. BOOT reads :func:`payload` from its standard input: this
file and the module_utils it needs (the very scheduler backends, tunnel and port code the modules run), as an
in-memory package; then this file serves one JSON answer line per JSON request line. Nothing is written on the
controller, no secret is involved and the command line is constant.

Requests (``path``/``env``: the resource's ``isession_scheduler_path``/``isession_scheduler_env``, optional):

``{"op": "query", "scheduler": S, "job_ids": [...], "timeout": T, "state_dir": D?, "path": P?, "env": E?}``
    -> ``{"jobs": {id: JobInfo dict}, "reachable": bool, "error": str}``
``{"op": "queue", "scheduler": S, "job_ids": [...], "timeout": T, "path": P?, "env": E?}``
    -> ``{"details": {id: {queue_position, queue_pending, start_time}}}``: where queued jobs wait (one query for all)
``{"op": "tail", "dir": D, "lines": N}``
    -> ``{"files": {name: text}}`` (log files only, never the secret)
``{"op": "teardown", "holding": {...}, "skip": [kind, ...]?, "timeout": T, "path": P?, "env": E?}``
    -> ``{"outcomes": [Outcome dicts], "error": str}``: the resource side of the one teardown (``_teardown``), the
    same calls the cancel playbook's ``session_teardown`` makes on the controller.
``{"op": "teardowns", "items": [{"holding": {...}, "skip": [...]?}, ...], "timeout": T, "path": P?, "env": E?}``
    -> ``{"answers": [teardown answers, in the items' order]}``: many sessions' teardowns at once (twenty cancels
    in one tick), carried out side by side (at most ``TEARDOWN_THREADS`` at a time) rather than one after another.

Run here (``python3 _remote_server.py`` with the collection importable) it serves on standard input and output
the same way, which is how its tests drive it without ssh.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import IO, Any, Dict, Mapping, Optional

PKG = "ansible_collections.hpc.interactive.plugins.module_utils"
# what the server imports on the controller, as paths under module_utils
SHIPPED = ("_cmd", "_proc", "_schedulers/__init__", "_schedulers/_registry", "_schedulers/_base",
           "_schedulers/_hostlist", "_schedulers/local", "_schedulers/pbs", "_schedulers/sge", "_schedulers/slurm",
           "_schedulers/_runtime", "_ports", "_tunnel", "_vocabulary", "_teardown")
MAIN = "__isession_remote__"  # the module name this file runs under on the controller

# Runs on the controller as ``python3 -c BOOT``: reads the payload and runs this file, which installs the importer.
BOOT = ("import sys, json\n"
        "n = int(sys.stdin.buffer.readline())\n"
        "S = json.loads(sys.stdin.buffer.read(n).decode())\n"
        "exec(compile(S['__main__'][1], '<isession>/_remote_server.py', 'exec'), "
        "{'__name__': '%s', 'SOURCES': S})\n" % MAIN)

LOGS = (".log", ".out", ".err", ".error")
TAIL_BYTES = 262144
TEARDOWN_THREADS = 8  # teardowns of one "teardowns" request carried out at once (each mostly waits on a command)


def own_source() -> str:
    """This file's text (what BOOT runs), also when it was loaded from a zip or by the collection loader."""
    from ansible_collections.hpc.interactive.plugins.module_utils._proc import source_of  # noqa: PLC0415

    return source_of(sys.modules[__name__])


def payload(mu_dir: Optional[str] = None) -> bytes:
    """What BOOT reads: ``<length>\\n<json>`` mapping module names to ``[is_package, source]``, plus ``__main__``."""
    mu_dir = mu_dir or os.path.dirname(os.path.abspath(__file__))
    sources = {}  # type: Dict[str, List[Any]]
    parts = PKG.split(".")
    for i in range(1, len(parts) + 1):
        sources[".".join(parts[:i])] = [True, ""]
    for rel in SHIPPED:
        with open(os.path.join(mu_dir, rel + ".py"), encoding="utf-8") as fh:
            text = fh.read()
        if rel.endswith("/__init__"):
            sources["%s.%s" % (PKG, rel[:-len("/__init__")].replace("/", "."))] = [True, text]
        else:
            sources["%s.%s" % (PKG, rel.replace("/", "."))] = [False, text]
    sources["__main__"] = [False, own_source()]
    body = json.dumps(sources).encode()
    return str(len(body)).encode() + b"\n" + body


def install_importer(sources: Mapping[str, Any]) -> None:
    """Make the shipped sources importable by name (the controller has no copy of the collection)."""
    import importlib.abc  # noqa: PLC0415 - only on the controller
    import importlib.util  # noqa: PLC0415

    class SourceImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
            if name in sources and name != "__main__":
                return importlib.util.spec_from_loader(name, self, is_package=bool(sources[name][0]))
            return None

        def create_module(self, spec):  # type: ignore[no-untyped-def]
            return None

        def exec_module(self, module):  # type: ignore[no-untyped-def]
            is_pkg, src = sources[module.__name__]
            if is_pkg:
                module.__path__ = []
            exec(compile(src, "<isession>/" + module.__name__, "exec"), module.__dict__)  # noqa: S102

    sys.meta_path.insert(0, SourceImporter())


# ---------------------------------------------------------------------------- the requests
class Server:
    """Answers requests; keeps one command runner per scheduler setup (path, env) it was asked with."""

    def __init__(self) -> None:
        self.runners = {}  # type: Dict[str, Any]

    def runner_for(self, req: Mapping[str, Any]) -> Any:
        from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._runtime import (  # noqa: PLC0415
            make_runner,
            scheduler_setup,
        )

        key = json.dumps([req.get("path") or [], req.get("env") or {}], sort_keys=True)
        if key not in self.runners:
            self.runners[key] = make_runner(shutil.which, *scheduler_setup(req.get("path"), req.get("env")))
        return self.runners[key]

    def query(self, req: Mapping[str, Any]) -> Dict[str, Any]:
        from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._registry import get_backend  # noqa: PLC0415

        backend = get_backend(req["scheduler"], state_dir=expand(req.get("state_dir")))
        res = backend.poll(self.runner_for(req), [str(j) for j in req["job_ids"]], timeout=float(req.get("timeout", 5)))
        return {"jobs": {k: v.as_dict() for k, v in res.jobs.items()}, "reachable": res.reachable,
                "error": res.error}

    def queue(self, req: Mapping[str, Any]) -> Dict[str, Any]:
        from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._registry import get_backend  # noqa: PLC0415

        backend = get_backend(req["scheduler"], state_dir=expand(req.get("state_dir")))
        return {"details": backend.queue_details(self.runner_for(req), [str(j) for j in req["job_ids"]],
                                                 timeout=float(req.get("timeout", 5)))}

    def teardown(self, req: Mapping[str, Any]) -> Dict[str, Any]:
        from ansible_collections.hpc.interactive.plugins.module_utils import _teardown as T  # noqa: PLC0415

        holding = T.Holding(**req["holding"])
        timeout = float(req.get("timeout", 5))
        ctx = T.Context(runner=self.runner_for(req) if holding.scheduler not in (None, "local") else None,
                        local_state_dir=expand(req.get("state_dir")), timeout=timeout, query_timeout=timeout)
        outcomes = T.teardown(holding, T.RESOURCE, ctx, skip=req.get("skip") or ())
        return {"outcomes": [o.as_dict() for o in outcomes], "error": "; ".join(T.errors(outcomes))}

    def teardowns(self, req: Mapping[str, Any]) -> Dict[str, Any]:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - only for a burst of cancels

        items = [dict(req, holding=item["holding"], skip=item.get("skip") or []) for item in req["items"]]
        with ThreadPoolExecutor(max_workers=max(1, min(TEARDOWN_THREADS, len(items)))) as pool:
            return {"answers": list(pool.map(self._teardown_answer, items))}

    def _teardown_answer(self, req: Mapping[str, Any]) -> Dict[str, Any]:
        try:
            return self.teardown(req)
        except Exception as exc:  # noqa: BLE001 - one session's trouble must not lose the others' answers
            return {"outcomes": [], "error": "%s: %s" % (type(exc).__name__, exc)}

    def handle(self, req: Mapping[str, Any]) -> Dict[str, Any]:
        op = req.get("op", "query")
        if op == "tail":
            return tail(req["dir"], int(req.get("lines", 200)))
        if op == "teardown":
            return self.teardown(req)
        if op == "teardowns":
            return self.teardowns(req)
        if op == "queue":
            return self.queue(req)
        if op == "query":
            return self.query(req)
        raise ValueError("unknown op %r" % (op,))

    def serve(self, stdin: IO[bytes], stdout: IO[str]) -> None:
        """One JSON answer line per JSON request line until standard input ends."""
        for line in stdin:
            try:
                ans = self.handle(json.loads(line))
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the session
                ans = {"error": "%s: %s" % (type(exc).__name__, exc), "reachable": False, "jobs": {}}
            stdout.write(json.dumps(ans) + "\n")
            stdout.flush()


def expand(path: Optional[str]) -> Optional[str]:
    return os.path.expanduser(path) if path else None


def tail(directory: str, lines: int) -> Dict[str, Any]:
    """The last ``lines`` lines of each log file in ``directory``: never the secret, never through a symlink."""
    directory = os.path.expanduser(directory)
    out = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        path = os.path.join(directory, name)
        if name.startswith("secret") or not name.endswith(LOGS) or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - TAIL_BYTES))
            out[name] = "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
    return {"files": out}


def main() -> None:
    Server().serve(sys.stdin.buffer, sys.stdout)


if __name__ == MAIN:  # pragma: no cover - runs on the controller, through BOOT
    install_importer(globals()["SOURCES"])
    main()
elif __name__ == "__main__":  # pragma: no cover - a local run with the collection importable
    main()
