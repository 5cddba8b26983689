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
  - With O(watcher_argv), the wait also keeps the user's watcher running, on which it depends. It runs that command
    (which starts the watcher unless one runs) before it waits, and again whenever the watcher exits during the
    wait (a killed or crashed watcher would otherwise leave the start waiting until O(timeout) although its job
    runs). It learns of the watcher's exit at once where the system has pidfds (Linux 5.3 and later), otherwise
    within 5 seconds. When the command fails, or the watcher exits more than 5 times during one wait, the wait
    returns RV(watcher=false) without failing, and the caller follows the job by itself.
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
  watcher_argv:
    description:
      - The command that ensures the user's watcher runs (idempotent, e.g. C(isession watch --daemon)), as an argv
        list. Without it the wait does not look at the watcher.
    type: list
    elements: str
  watcher_env:
    description: Environment variables added for O(watcher_argv) (e.g. C(ISESSION_ROOT)).
    type: dict
author: [hpc.interactive developers (@hpc-interactive)]
"""

EXAMPLES = r"""
- name: Wait until the watcher sees the job start
  hpc.interactive.session_wait:
    id: "{{ session_id }}"
    timeout: "{{ session_queue_timeout }}"

- name: The same, keeping the user's watcher running during the wait
  hpc.interactive.session_wait:
    id: "{{ session_id }}"
    timeout: "{{ session_queue_timeout }}"
    watcher_argv: [isession, watch, --daemon]
    watcher_env:
      ISESSION_ROOT: "{{ session_root }}"
  register: queue_wait
"""

RETURN = r"""
step: {description: The step the wait ended on., returned: always, type: str, sample: starting}
waited: {description: Seconds waited., returned: always, type: float, sample: 12.3}
reason: {description: "The scheduler's last reason while queued (C(service.json) ERROR_MESSAGE).", returned: always,
         type: str, sample: Resources}
watcher:
  description: Whether a watcher of the user ran throughout the wait (false when O(watcher_argv) failed or the
    watcher kept exiting; the caller must then follow the job itself).
  returned: when O(watcher_argv) is given
  type: bool
  sample: true
watcher_starts: {description: How many times the wait started the watcher., returned: when O(watcher_argv) is given,
                 type: int, sample: 1}
"""

import functools
import json
import os
import select
import subprocess
import tempfile
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
from ansible_collections.hpc.interactive.plugins.module_utils._watcher_pid import exit_fd, watcher_pid

ARGUMENT_SPEC = dict(
    id=dict(type="str", required=True), root=dict(type="path"),
    steps=dict(type="list", elements="str", default=["starting", "running"]),
    timeout=dict(type="float", default=3600), interval=dict(type="float", default=0.1),
    watcher_argv=dict(type="list", elements="str"), watcher_env=dict(type="dict"),
)
MODULE_OPTIONS = dict(supports_check_mode=True, required_by={"watcher_env": "watcher_argv"})
RECHECK = 30.0  # seconds: a re-read of the record while inotify reports no change (a change it could miss)
WATCHER_CHECK = 5.0  # seconds between looks at the watcher's lock where no pidfd tells of its exit
WATCHER_RESTARTS = 5  # exits of the watcher during one wait after which the caller follows the job by itself
WATCHER_START_TIMEOUT = 30.0  # seconds for watcher_argv


def queued_reason(directory: str) -> str:
    try:
        with open(os.path.join(directory, "service.json"), encoding="utf-8") as handle:
            return str(json.load(handle).get("ERROR_MESSAGE") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def wait_steps(state_path: str, steps, timeout: float, interval: float, *, clock=time.monotonic, sleep=time.sleep,
               gone=None):
    """(record, waited, why): ``why`` is "" when a wanted step came, "ended" or "timeout" otherwise, "watcher" when
    ``gone()`` (asked at every wake-up) said the watcher the wait depends on has exited."""
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
        if gone is not None and gone():
            return record, waited, "watcher"
        sleep(min(interval, max(0.0, timeout - waited)))


class Watcher:
    """The user's watcher as a queued start depends on it: started when it does not run, watched while it does."""

    def __init__(self, root: str, argv, env) -> None:
        self.root = root
        self.argv = list(argv)
        self.env = dict(os.environ, **{k: str(v) for k, v in (env or {}).items()})
        self.starts = 0
        self.exits = 0
        self.fd = None
        self.problem = ""

    def ensure(self) -> bool:
        """Run the command unless a watcher runs; False (with ``problem``) when none can be had."""
        if watcher_pid(self.root) is not None:
            return True
        if self.exits > WATCHER_RESTARTS:
            self.problem = "the user's watcher exited %d times during the wait" % self.exits
            return False
        # its output goes to a file, not a pipe: the command's end counts, not the end of its output, which a
        # daemon that kept the descriptor would hold open
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                rc = subprocess.run(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    timeout=WATCHER_START_TIMEOUT, check=False).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                self.problem = "%s: %s" % (self.argv[0], exc)
                return False
            out.seek(0)
            err.seek(0)
            said, words = out.read(65536), err.read(65536).decode(errors="replace").strip().splitlines()
        if rc != 0:
            words = words or said.decode(errors="replace").strip().splitlines()
            self.problem = "%s exited with status %d%s" % (self.argv[0], rc, ": " + words[-1] if words else "")
            return False
        if b"watcher started" in said:
            self.starts += 1
        return True

    def exit_fd(self):
        """A descriptor readable once the running watcher exits (closed by the caller), or None: see ``exit_fd``."""
        self.fd = exit_fd(self.root)
        return self.fd

    def gone(self) -> bool:
        """True when the watcher the wait follows has exited: its pidfd is readable (even while some other process
        still shares its lock), or, without a pidfd, its lock is free. The wait then looks again; every True counts
        as an exit, so a readable pidfd cannot make the wait spin."""
        if self.fd is not None:
            ended = bool(select.select([self.fd], [], [], 0)[0])
        else:
            ended = watcher_pid(self.root) is None
        if ended:
            self.exits += 1
        return ended


def run_module(module: AnsibleModule) -> None:
    p = module.params
    if p["timeout"] < 0 or p["interval"] <= 0:
        module.fail_json(msg="timeout must not be negative and interval must be positive", field="timeout")
    if p["watcher_argv"] is not None and not p["watcher_argv"]:
        module.fail_json(msg="watcher_argv must name a command", field="watcher_argv")
    timeout = 0.0 if module.check_mode else p["timeout"]
    try:
        root = p["root"] or default_root()
        paths = session_paths(root, p["id"])
        watcher = Watcher(root, p["watcher_argv"], p["watcher_env"]) if p["watcher_argv"] else None
        following = watcher is not None and not module.check_mode
        followed = True
        waited = 0.0
        # the record changes by a rename in its directory: with inotify the wait sleeps until then (and re-reads the
        # record every RECHECK s besides); without it, it checks the modification time every interval
        with Changes(paths["dir"]) as changes:
            while True:
                if following and not watcher.ensure():
                    followed, why = False, "watcher"
                    record = read_record(paths["state"]) if os.path.exists(paths["state"]) else None
                    break
                # the watcher's exit wakes the wait at once through a pidfd; without one its lock is looked at
                # every WATCHER_CHECK s
                exited = watcher.exit_fd() if following else None
                pace = RECHECK if changes.active else p["interval"]
                if following and exited is None:
                    pace = min(pace, WATCHER_CHECK)
                try:
                    record, part, why = wait_steps(
                        paths["state"], p["steps"], max(0.0, timeout - waited), pace,
                        sleep=functools.partial(changes.wait, also=() if exited is None else (exited,)),
                        gone=watcher.gone if following else None)
                finally:
                    if exited is not None:
                        os.close(exited)
                waited += part
                if why != "watcher":
                    break
    except (StateError, ValueError, OSError) as exc:
        module.fail_json(msg="cannot read the session record: %s" % exc, field="id")
    step = (record or {}).get("step") or ""
    reason = queued_reason(paths["dir"])
    result = dict(changed=bool(watcher and watcher.starts), step=step, waited=round(waited, 3), reason=reason)
    if watcher is not None:
        result.update(watcher=followed, watcher_starts=watcher.starts)
        if not followed:
            module.exit_json(msg="not followed through the user's watcher: %s" % watcher.problem, **result)
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
