# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Glue shared by the scheduler modules: a runner resolving binaries, script writes, waiting."""
from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

from ansible_collections.hpc.interactive.plugins.module_utils._cmd import CommandResult, Runner, run
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._base import (
    ALIVE_STATES,
    TERMINAL_STATES,
    Backend,
    JobInfo,
)


def make_runner(resolve: Callable[[str], Optional[str]]) -> Runner:
    """A runner that resolves ``argv[0]`` with ``resolve`` (e.g. ``module.get_bin_path``)."""

    def _run(argv: Sequence[str], timeout: Optional[float] = None) -> CommandResult:
        args = list(argv)
        args[0] = resolve(args[0]) or args[0]
        return run(args, timeout=timeout)

    return _run


def read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def write_atomic(path: str, text: str, mode: int = 0o700) -> None:
    """Write the batch script atomically, making its directory (0700) first if needed."""
    # imported here: the watcher ships this file to controllers without _service_file and never writes scripts
    from ansible_collections.hpc.interactive.plugins.module_utils import _service_file  # noqa: PLC0415

    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    _service_file.write_atomic(path, text, mode)


def wait_for_state(backend: Backend, runner: Runner, job_id: str, wanted: str, timeout: float, *,
                   query_timeout: float = 10.0, interval: float = 0.1, max_interval: float = 1.0,
                   clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
    """Poll until the job is ``wanted`` (``queued`` = known to the scheduler and alive or later).

    Returns (info, ok, why). ``ok`` is False on timeout or when the job ended before ``running``. The first query
    is immediate; the pause between queries starts at ``interval`` and grows by half up to ``max_interval``, so a
    job that starts at once is seen at once and a long wait does not flood the scheduler.
    """
    deadline = clock() + timeout
    info = JobInfo(job_id=job_id)
    while True:
        info = backend.query(runner, job_ids=[job_id], timeout=query_timeout).jobs.get(job_id, info)
        if wanted == "queued" and (info.state in ALIVE_STATES or info.state in TERMINAL_STATES):
            return info, True, ""
        if wanted == "running" and info.state == "running":
            return info, True, ""
        if wanted == "running" and info.state in TERMINAL_STATES:
            return info, False, "job %s ended (%s) before it was running" % (job_id, info.state)
        if clock() >= deadline:
            return info, False, "job %s not %s after %ss (state %s)" % (job_id, wanted, timeout, info.state)
        sleep(min(interval, max(0.0, deadline - clock())))
        interval = min(interval * 1.5, max_interval)
