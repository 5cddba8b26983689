# Test-bed helper, not part of the collection: a stdout callback that prints one JSON document
# (plays -> tasks -> per-host results, plus stats) at the end of a playbook run.
# ansible-core ships no json callback (it lives in ansible.posix), so the bed carries this one.
from __future__ import annotations

import json

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: bed_json
type: stdout
short_description: one JSON document per run (hpc.interactive test bed)
description:
  - Prints plays, tasks, per-host results (with diff and warnings kept) and stats as JSON.
"""

_INTERNAL_PREFIX = "_ansible_"


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not str(k).startswith(_INTERNAL_PREFIX)}
    if isinstance(value, (list, tuple)):
        return [_strip(v) for v in value]
    return value


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "bed_json"

    def __init__(self, display=None):
        super().__init__(display)
        self.results = []

    def _new_play(self, play):
        return {"play": {"name": play.get_name(), "id": str(play._uuid)}, "tasks": []}

    def _new_task(self, task):
        return {"task": {"name": task.get_name(), "id": str(task._uuid), "action": task.action}, "hosts": {}}

    def v2_playbook_on_play_start(self, play):
        self.results.append(self._new_play(play))

    def v2_playbook_on_task_start(self, task, is_conditional):
        if self.results:
            self.results[-1]["tasks"].append(self._new_task(task))

    def v2_playbook_on_handler_task_start(self, task):
        self.v2_playbook_on_task_start(task, False)

    def _record(self, result, **extra):
        if not self.results or not self.results[-1]["tasks"]:
            return
        data = _strip(dict(result.result))
        data.update(extra)
        data.setdefault("action", result.task.action)
        self.results[-1]["tasks"][-1]["hosts"][result.host.get_name()] = data

    def v2_runner_on_ok(self, result):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, failed=True, ignore_errors=bool(ignore_errors))

    def v2_runner_on_unreachable(self, result):
        self._record(result, unreachable=True)

    def v2_runner_on_skipped(self, result):
        self._record(result, skipped=True)

    def v2_playbook_on_stats(self, stats):
        summary = {h: stats.summarize(h) for h in sorted(stats.processed)}
        doc = {"plays": self.results, "stats": summary, "custom_stats": stats.custom}
        self._display.display(json.dumps(doc, indent=2, sort_keys=True, default=str))
