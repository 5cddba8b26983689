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
    thread hands a result over, so a result is taken as soon as it arrives and a task that runs for hours costs
    nothing while it runs (a check for dead workers or a stopped run every 30 seconds; a signal to
    C(ansible-playbook) acts at once, as with C(linear)).
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

from collections import deque

from ansible.errors import AnsibleError
from ansible.plugins.strategy.linear import StrategyModule as LinearStrategyModule

# seconds between checks for dead workers and a stopped run while no result comes: each check wakes a process that
# may wait for hours (a start whose job is queued), and fifty may wait at once; a worker that dies is rare, and a
# Ctrl-C or SIGTERM reaches ansible-playbook's handlers without this check
CHECK_EVERY = 30.0


class _WakingDeque(deque):
    """The strategy's result queue, waking the waiting strategy on every result.

    ansible-core's results thread appends each task result while it holds the strategy's ``_results_lock`` (a
    ``threading.Condition``); notifying that condition here wakes :meth:`StrategyModule._wait_on_pending_results`.
    """

    def __init__(self, items, condition):
        super().__init__(items)
        self._condition = condition

    def append(self, x):
        super().append(x)
        try:
            self._condition.notify_all()
        except RuntimeError:  # appended without the lock: the waiter sees it at its next check instead
            pass


class StrategyModule(LinearStrategyModule):
    """``linear`` whose wait for pending results sleeps until a result arrives."""

    def __init__(self, tqm):
        super().__init__(tqm)
        with self._results_lock:
            self._results = _WakingDeque(self._results, self._results_lock)

    def _wait_on_pending_results(self, iterator):
        # ansible-core's loop (StrategyBase._wait_on_pending_results) with its 1 ms sleep replaced by a wait on the
        # condition the results thread notifies
        ret_results = []
        while self._pending_results > 0 and not self._tqm._terminated:
            if self._tqm.has_dead_workers():
                raise AnsibleError("A worker was found in a dead state")
            results = self._process_pending_results(iterator)
            ret_results.extend(results)
            if self._pending_results > 0 and not results:
                with self._results_lock:
                    if not self._results:
                        self._results_lock.wait(CHECK_EVERY)
        return ret_results
