# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
name: linear_idle
author:
  - hpc.interactive developers (@hpc-interactive)
version_added: 0.1.0
short_description: The linear strategy, waiting for a task's result without polling a thousand times a second
description:
  - Runs a play exactly as C(ansible.builtin.linear) does (task by task, every host before the next task).
  - Only the wait for a running task's result differs. ansible-core checks for results every
    C(internal_poll_interval) seconds (0.001 by default), however long the task runs, which costs about 2% of a
    core per C(ansible-playbook) process while a task waits. This strategy sleeps until ansible-core's results
    thread hands a result over or a worker process exits, so a result is taken as soon as it arrives, a worker that
    dies is found at once, and a task that runs for hours costs nothing while it runs (a last look every
    10 minutes, should a change come some other way; a signal to C(ansible-playbook) acts at once, as with
    C(linear), since ansible-core passes it to the workers and their exit wakes the wait).
  - It also loads ansible-core's Jinja filter and test plugins once, in C(ansible-playbook) itself, before the first
    task. ansible-core forks a worker process for every task, and each worker found the lists empty and loaded them
    again (about 6 ms per task, skipped tasks too); a worker now inherits them loaded.
  - And it spares C(ansible-playbook) the last collection of Python's garbage collector as it exits (C(gc.freeze) at
    exit, since the memory goes with the process), which scanned every object the run ever made, about 0.09 s at
    the end of every run.
  - An C(isession start) waiting for its queued job keeps one C(ansible-playbook) process waiting for as long as
    the job waits, so C(isession) runs its plays with this strategy unless the user chose one in E(ANSIBLE_STRATEGY).
notes:
  - Select it with E(ANSIBLE_STRATEGY=hpc.interactive.linear_idle), the C(strategy) setting of C(ansible.cfg)
    or a play's C(strategy) keyword.
"""

EXAMPLES = r"""
# ansible.cfg
# [defaults]
# strategy = hpc.interactive.linear_idle

- name: Start a JupyterLab session that may wait in the queue for a long time
  hosts: localhost
  strategy: hpc.interactive.linear_idle
  roles:
    - role: hpc.interactive.jupyterlab
"""

import atexit
import gc
import multiprocessing.connection
import os
from collections import deque

from ansible.errors import AnsibleError
from ansible.plugins.loader import filter_loader, test_loader
from ansible.plugins.strategy.linear import StrategyModule as LinearStrategyModule

# seconds between looks while no result comes and no worker exits: only a last resort (a stopped run, a worker whose
# exit its sentinel cannot tell), since each look wakes a process that may wait for hours (a start whose job is
# queued), and fifty may wait at once
CHECK_EVERY = 600.0
REAP_WAIT = 1.0  # seconds at most for an exiting worker to become reapable (milliseconds in practice)


class _WakingDeque(deque):
    """The strategy's result queue, waking the waiting strategy on every result.

    ansible-core's results thread appends each task result (under the strategy's ``_results_lock``); each append
    writes a byte into a pipe that :meth:`StrategyModule._wait_on_pending_results` sleeps on. A pipe, not a
    condition: the wait can then sleep on the workers' exits too, and a result that comes between the wait's look
    and its sleep is a byte already there, so the sleep ends at once.
    """

    def __init__(self, items, wake_fd: int):
        super().__init__(items)
        self._wake_fd = wake_fd

    def append(self, x):
        super().append(x)
        try:
            os.write(self._wake_fd, b"!")
        except OSError:  # the pipe is full (a wake-up is pending already) or closed (the play ended)
            pass


def live_sentinels(workers) -> dict:
    """{sentinel: worker} of the worker processes that have not exited yet (a sentinel is readable once it exits)."""
    out = {}
    for worker in workers or ():
        try:
            if worker is not None and worker.exitcode is None:
                out[worker.sentinel] = worker
        except (ValueError, AttributeError):  # not started yet, or closed
            continue
    return out


def reap(worker) -> None:
    """Wait for the exit a worker's sentinel announced: its files are closed before it can be reaped, and until
    then its exit code reads as still running (a wait on it would return at once, again and again)."""
    try:
        worker.join(REAP_WAIT)
    except (AssertionError, ValueError):  # not this process's child, or closed: ansible-core's own check decides
        pass


def drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:  # empty (EAGAIN) or closed
        pass


def load_jinja_plugins(loaders=(filter_loader, test_loader)) -> int:
    """Load the Jinja filter and test plugins in this process, so that every worker forked later inherits them.

    The loaders keep what they loaded (the plugins of ansible-core and of the configured plugin paths, the same lists
    a worker would build on its first template), but a worker's own loading never reaches the process that forks the
    next one. Best effort: a loader that fails here fails again, with its own message, in the worker that needs it.
    Returns how many plugins are loaded.
    """
    count = 0
    for loader in loaders:
        try:
            count += sum(1 for _plugin in loader.all())
        except Exception:  # noqa: BLE001, S112 - the worker loads them itself, as with linear
            continue
    return count


def skip_last_collection() -> None:
    """At exit, move every object to the collector's permanent generation (once per process).

    Python's finalisation collects garbage one last time, over every object of the process; an ``ansible-playbook``
    that ran a play holds many, and that collection took about 0.09 s of its exit. The handler runs first at exit
    (handlers run last registered, first called) and frees nothing itself: the exit frees it all.
    """
    if not getattr(skip_last_collection, "registered", False):
        atexit.register(gc.freeze)
        skip_last_collection.registered = True  # type: ignore[attr-defined]


class StrategyModule(LinearStrategyModule):
    """``linear`` whose wait for pending results sleeps until a result arrives or a worker exits."""

    def __init__(self, tqm):
        super().__init__(tqm)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        with self._results_lock:
            self._results = _WakingDeque(self._results, self._wake_w)
        load_jinja_plugins()
        skip_last_collection()

    def cleanup(self):
        try:
            super().cleanup()  # joins the results thread: nothing appends after it
        finally:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _wait_on_pending_results(self, iterator):
        # ansible-core's loop (StrategyBase._wait_on_pending_results) with its 1 ms sleep replaced by a sleep until a
        # result is appended or a running worker exits (its exit code is then looked at by has_dead_workers)
        ret_results = []
        while self._pending_results > 0 and not self._tqm._terminated:
            if self._tqm.has_dead_workers():
                raise AnsibleError("A worker was found in a dead state")
            results = self._process_pending_results(iterator)
            ret_results.extend(results)
            if self._pending_results > 0 and not results:
                workers = live_sentinels(self._tqm._workers)
                for ready in multiprocessing.connection.wait([self._wake_r, *workers], timeout=CHECK_EVERY):
                    if ready == self._wake_r:
                        drain(self._wake_r)
                    else:
                        reap(workers[ready])
        return ret_results
