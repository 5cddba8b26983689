#!/usr/bin/python
# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: session_state
short_description: Create, update, tombstone or read a session's record (C(state.json)) on the workspace
version_added: 0.1.0
description:
  - Manages C(<root>/<id>/state.json), the one record of an interactive session (see the collection's
    C(docs/design/sessions.md)). The record is written atomically (temp file, fsync, rename) under a lock,
    mode 0600, in a directory of mode 0700.
  - O(op=create) makes the session directory, its C(logs/) directory, the record (step C(created)) and the
    session secret C(<dir>/secret) (0600, C(secrets.token_urlsafe(32)) generated inside the module). The secret
    is never returned, logged or passed anywhere; tasks refer to it by path only. An existing session is reused
    (fields given are merged) unless it was cancelled or has ended.
  - O(op=update) merges the given fields, appends C({step, at}) to C(history) when the step changes and refuses to
    leave a terminal step (C(cancelled), C(completed), C(failed)).
  - O(op=cancel) sets the tombstone C(cancel_requested=true) (a start in progress checks it) and returns the record;
    it creates a minimal record when none exists yet, so a start racing the cancel does not go on.
  - O(op=read) returns the record (C(exists=false) when there is none).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: predicts the new record; creates, writes and generates nothing.
  diff_mode:
    support: full
    details: C(state.json) before and after.
  platform:
    platforms: posix
options:
  op:
    description: The operation.
    type: str
    choices: [create, update, cancel, read]
    default: update
  id:
    description:
      - The session id, 1-55 characters of C([A-Za-z0-9._-]) starting with a letter or digit (its job name
        C(isession-<id>) then has at most 64).
    type: str
    required: true
  root:
    description:
      - The sessions root on the workspace. Default C(${XDG_STATE_HOME:-~/.local/state}/isession/sessions).
    type: path
  missing_ok:
    description: With O(op=update), a missing record is not an error (nothing is done).
    type: bool
    default: false
  service:
    description: The service name (for example V(jupyterlab), V(nginx)).
    type: str
  target:
    description: Where the session runs.
    type: str
    choices: [workspace, controller, compute]
  resource:
    description: The controller's inventory host (empty for the workspace target).
    type: str
  scheduler:
    description: The scheduler that runs the agent.
    type: str
    choices: [slurm, pbs, sge, local]
  step:
    description:
      - The step reached. In order C(created), C(ports_reserved), C(submitted), C(queued), C(starting), C(running),
        then one of the terminal steps C(cancelled), C(completed), C(failed).
    type: str
    choices: [created, ports_reserved, submitted, queued, starting, running, cancelled, completed, failed]
  job_id:
    description: The scheduler's job id.
    type: str
  job_name:
    description: The job name (C(isession-<id>)).
    type: str
  ports:
    description: Ports by role (V(workspace), V(node)); merged key by key, a V(null) value removes a key.
    type: dict
  pids:
    description: Process ids by role (V(agent), V(server), V(tunnel)); merged like O(ports).
    type: dict
  remote_dir:
    description: The session directory on the target host.
    type: str
  url:
    description: C(URL) of the session.
    type: str
    choices: [/me, /sme]
  slug:
    description: The URL tail after C(<URL>/<PORT>/).
    type: str
  error:
    description: Words about a failure (also written to C(service.json)'s C(ERROR_MESSAGE) by the roles).
    type: str
  cancel_requested:
    description: The tombstone. Once V(true) it cannot be set back to V(false).
    type: bool
  watch:
    description:
      - With O(op=create) or O(op=update), what the user's watcher needs to follow the session when it was not
        started by the C(isession) CLI (the inventory, the resource, the walltime), written to
        C(<dir>/watch.json) (mode 0600) in the same call. Nothing is written when it is unchanged.
    type: dict
author:
  - hpc.interactive developers (@hpc-interactive)
"""

EXAMPLES = r"""
- name: Create the session (directory, secret, record)
  hpc.interactive.session_state:
    op: create
    id: "{{ session_id }}"
    service: nginx
    target: workspace
    url: /me
  register: _session

- name: The agent runs
  hpc.interactive.session_state:
    id: "{{ session_id }}"
    step: starting
    job_id: "{{ _job.job_id }}"

- name: Ask a start in progress to stop, and learn what there is to undo
  hpc.interactive.session_state:
    op: cancel
    id: "{{ session_id }}"
  register: _record
"""

RETURN = r"""
record:
  description: The record after the operation (predicted in check mode); V({}) when there is none.
  returned: always
  type: dict
  sample:
    schema: 1
    id: nginx-20261125002543-a1b2c3
    service: nginx
    target: workspace
    step: running
    ports: {workspace: 23456}
    pids: {}
    cancel_requested: false
    history: [{step: created, at: 1764030343.1}, {step: running, at: 1764030344.0}]
exists:
  description: Whether a record existed before the operation.
  returned: always
  type: bool
  sample: true
dir:
  description: The session directory.
  returned: always
  type: str
  sample: /home/wsuser/.local/state/isession/sessions/nginx-20261125002543-a1b2c3
state_path:
  description: The path of C(state.json).
  returned: always
  type: str
  sample: /home/wsuser/.local/state/isession/sessions/nginx-20261125002543-a1b2c3/state.json
secret_path:
  description: The path of the secret file (its content is never returned).
  returned: always
  type: str
  sample: /home/wsuser/.local/state/isession/sessions/nginx-20261125002543-a1b2c3/secret
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hpc.interactive.plugins.module_utils._state import (
    FIELDS,
    SCHEDULERS,
    STEPS,
    TARGETS,
    URLS,
    StateError,
    default_root,
    public_view,
    run_op,
    write_watch,
)


class SessionState:
    """Plan the operation from the current record, report it, apply it unless in check mode."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params

    def run(self) -> None:
        p = self.params
        root = p["root"] or default_root()
        updates = {field: p[field] for field in FIELDS}
        try:
            plan = run_op(p["op"], root, p["id"], updates, check=self.module.check_mode, missing_ok=p["missing_ok"])
        except StateError as exc:
            self.module.fail_json(msg=exc.msg, field=exc.field)
        except OSError as exc:
            self.module.fail_json(msg="cannot write the session record under %s: %s" % (root, exc), field="root")
        watch_changed = False
        if p["watch"] is not None and p["op"] in ("create", "update") and plan.after is not None:
            try:
                watch_changed = write_watch(plan.paths["dir"], p["watch"], check=self.module.check_mode)
            except (OSError, ValueError) as exc:  # ValueError: StateError (watch.json is a link, a dir, unreadable)
                self.module.fail_json(msg="cannot write %s/watch.json: %s" % (plan.paths["dir"], exc), field="watch")
        result = {
            "changed": plan.changed or watch_changed,
            "record": public_view(plan.after),
            "exists": plan.before is not None,
            "dir": plan.paths["dir"],
            "state_path": plan.paths["state"],
            "secret_path": plan.paths["secret"],
        }
        if self.module._diff and plan.changed:
            result["diff"] = {"before": plan.before_text, "after": plan.after_text,
                              "before_header": plan.paths["state"], "after_header": plan.paths["state"]}
        self.module.exit_json(**result)


ARGUMENT_SPEC = dict(
    op=dict(type="str", choices=["create", "update", "cancel", "read"], default="update"),
    id=dict(type="str", required=True),
    root=dict(type="path"),
    missing_ok=dict(type="bool", default=False),
    service=dict(type="str"),
    target=dict(type="str", choices=list(TARGETS)),
    resource=dict(type="str"),
    scheduler=dict(type="str", choices=list(SCHEDULERS)),
    step=dict(type="str", choices=list(STEPS)),
    job_id=dict(type="str"),
    job_name=dict(type="str"),
    ports=dict(type="dict"),
    pids=dict(type="dict"),
    remote_dir=dict(type="str"),
    url=dict(type="str", choices=list(URLS)),
    slug=dict(type="str"),
    error=dict(type="str"),
    cancel_requested=dict(type="bool"),
    watch=dict(type="dict"),
)

MODULE_OPTIONS = dict(supports_check_mode=True)


def run_module(module: AnsibleModule) -> None:
    """The module's work; also run inside the Ansible worker by the action plugin of the same name."""
    SessionState(module).run()


def main() -> None:
    run_module(AnsibleModule(argument_spec=ARGUMENT_SPEC, **MODULE_OPTIONS))


if __name__ == "__main__":
    main()
