#!/usr/bin/python
# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: session_wait
short_description: Wait on the workspace's session record until the session's job leaves the queue
version_added: 0.2.0
description:
  - Waits until C(state.json) of session O(id) reaches one of O(steps) (by default C(starting) or C(running)) or
    ends, reading only the workspace's own files - never the cluster. The user's watcher writes the record; it asks
    each resource once per tick for the jobs of all the user's sessions over its one connection, so a queued start
    costs the cluster nothing and N queued starts cost the watcher one query per resource.
  - Sleeps until a file of the session directory changes (Linux inotify; the record is rewritten by a rename there),
    so a wait of hours costs nothing; reads the record only when its modification time changed. Without inotify
    it checks the modification time every O(interval) seconds.
  - Fails when the session ends while waiting (with the record's error, or "the session was cancelled") and when
    O(timeout) passes first ("the job waited in the queue longer than N s", with the scheduler's last reason from
    C(service.json)).
  - Runs inside the Ansible worker on the workspace (an action plugin of the same name), so a wait costs no module
    shipping.
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reads the record once and does not wait.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  id:
    description: The session id.
    type: str
    required: true
  root:
    description: The workspace's session root (default C(${XDG_STATE_HOME:-~/.local/state}/isession/sessions)).
    type: path
  steps:
    description: Steps that end the wait successfully.
    type: list
    elements: str
    default: [starting, running]
  timeout:
    description: Seconds to wait (the role's C(session_queue_timeout)).
    type: float
    default: 3600
  interval:
    description: Seconds between checks of the record's modification time where inotify is not available.
    type: float
    default: 0.1
author: [hpc.interactive developers (@hpc-interactive)]
"""

EXAMPLES = r"""
- name: Wait until the watcher sees the job start
  hpc.interactive.session_wait:
    id: "{{ session_id }}"
    timeout: "{{ session_queue_timeout }}"
"""

RETURN = r"""
step: {description: The step the wait ended on., returned: always, type: str, sample: starting}
waited: {description: Seconds waited., returned: always, type: float, sample: 12.3}
reason: {description: "The scheduler's last reason while queued (C(service.json) ERROR_MESSAGE).", returned: always,
         type: str, sample: Resources}
"""

import json
import os
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hpc.interactive.plugins.module_utils._dirwatch import Changes, stamp_of, unchanged
from ansible_collections.hpc.interactive.plugins.module_utils._state import (
    TERMINAL_STEPS,
    StateError,
    default_root,
    read_record,
    session_paths,
)

ARGUMENT_SPEC = dict(
    id=dict(type="str", required=True), root=dict(type="path"),
    steps=dict(type="list", elements="str", default=["starting", "running"]),
    timeout=dict(type="float", default=3600), interval=dict(type="float", default=0.1),
)
MODULE_OPTIONS = dict(supports_check_mode=True)
RECHECK = 30.0  # seconds: a re-read of the record while inotify reports no change (a change it could miss)


def queued_reason(directory: str) -> str:
    try:
        with open(os.path.join(directory, "service.json"), encoding="utf-8") as handle:
            return str(json.load(handle).get("ERROR_MESSAGE") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def wait_steps(state_path: str, steps, timeout: float, interval: float, *, clock=time.monotonic, sleep=time.sleep):
    """(record, waited, why): ``why`` is "" when a wanted step came, "ended" or "timeout" otherwise."""
    started = clock()
    seen = None
    record = None
    while True:
        try:
            st = os.stat(state_path)
            stamp, changed = stamp_of(st), not unchanged(st, seen)
        except FileNotFoundError:
            stamp, changed = None, seen is not None
        if changed:
            seen = stamp
            record = read_record(state_path) if stamp else None
            step = (record or {}).get("step")
            if step in steps:
                return record, clock() - started, ""
            if step in TERMINAL_STEPS:
                return record, clock() - started, "ended"
        waited = clock() - started
        if waited >= timeout:
            return record, waited, "timeout"
        sleep(min(interval, max(0.0, timeout - waited)))


def run_module(module: AnsibleModule) -> None:
    p = module.params
    if p["timeout"] < 0 or p["interval"] <= 0:
        module.fail_json(msg="timeout must not be negative and interval must be positive", field="timeout")
    try:
        paths = session_paths(p["root"] or default_root(), p["id"])
        # the record changes by a rename in its directory: with inotify the wait sleeps until then (and re-reads the
        # record every RECHECK s besides); without it, it checks the modification time every interval
        with Changes(paths["dir"]) as changes:
            record, waited, why = wait_steps(paths["state"], p["steps"], 0.0 if module.check_mode else p["timeout"],
                                             RECHECK if changes.active else p["interval"], sleep=changes.wait)
    except (StateError, ValueError, OSError) as exc:
        module.fail_json(msg="cannot read the session record: %s" % exc, field="id")
    step = (record or {}).get("step") or ""
    reason = queued_reason(paths["dir"])
    result = dict(changed=False, step=step, waited=round(waited, 3), reason=reason)
    if why == "ended":
        module.fail_json(msg=(record or {}).get("error") or "the session was %s while its job waited" % step,
                         **result)
    if why == "timeout" and not module.check_mode:
        why_waiting = ": " + reason if reason else ""
        module.fail_json(msg="the job waited in the queue longer than %g s%s" % (p["timeout"], why_waiting), **result)
    module.exit_json(**result)


def main() -> None:
    run_module(AnsibleModule(argument_spec=ARGUMENT_SPEC, **MODULE_OPTIONS))


if __name__ == "__main__":
    main()
