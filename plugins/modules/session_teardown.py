#!/usr/bin/python
# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: session_teardown
short_description: Undo what an interactive session holds on one host, in the one teardown order
version_added: 0.2.0
description:
  - Undoes, on the host the task runs on, everything of the session O(id) that lives on that O(side), in the
    collection's one teardown order (C(plugins/module_utils/_teardown.py), C(docs/design/teardown.md)). The cancel
    playbook and the start's rescue call it once per side; the user's watcher runs the same table.
  - O(side=resource) (the controller) - the batch job, or the detached agent of the controller target (found by
    its name C(isession-<id>)), then a stop request to a compute session's agent (C(agent.stop) in O(remote_dir),
    which the agent polls; it reaches an agent on a node the scheduler lost), then the controller-side tunnel
    (controller target, needs O(remote_dir)), then the node ports reserved there (controller target).
  - O(side=workspace) - the local agent (workspace target), then this user's processes still listening on
    O(workspace_port), then the workspace port's reservation, released only once no listener of this user is left
    on the port (waited for a second; otherwise it stays, a warning says so and RV(pending) names it).
  - Every kind is undone only if it is still there, so the module is safe in every state of a session (nothing
    reserved yet, queued, starting, running, already ended) and safe to run twice. One kind that cannot be undone
    (the scheduler does not answer, a cancel is refused) does not stop the others; the module then fails naming it.
  - Session files (directories, logs) are kept, as the session's record.
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - hpc.interactive.scheduler_env
attributes:
  check_mode:
    support: full
    details: Reports what would be undone; signals, cancels and releases nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  id:
    description: The session id, 1-55 characters of C([A-Za-z0-9._-]) starting with a letter or digit.
    type: str
    required: true
  side:
    description: Which side of the session lives on this host.
    type: str
    choices: [resource, workspace]
    required: true
  target:
    description: Where the session's agent runs (the record's C(target)); unknown when omitted.
    type: str
    choices: [workspace, controller, compute]
  scheduler:
    description: The scheduler that runs the agent (the record's C(scheduler)); without it no job is looked for.
    type: str
    choices: [slurm, pbs, sge, local]
  remote_dir:
    description: The session directory on the controller (the record's C(remote_dir)); a leading C(~) is expanded.
    type: str
  workspace_port:
    description: The session's workspace port (the record's C(ports.workspace)).
    type: int
  skip:
    description: Resource kinds not to undo (V(job), V(agent), V(tunnel), V(node_ports), V(listeners),
      V(workspace_port)).
    type: list
    elements: str
    default: []
  pbs_flavor:
    description: The PBS flavour, as for M(hpc.interactive.scheduler_submit).
    type: str
    choices: [torque, pro]
    default: torque
  reservation_dir:
    description: The port reservation directory, as for M(hpc.interactive.free_port).
    type: path
    default: /tmp/isession-ports
  timeout:
    description: Seconds before a cancel command counts as timed out.
    type: int
    default: 30
  query_timeout:
    description: Seconds before a scheduler query counts as timed out.
    type: int
    default: 10
author:
  - hpc.interactive developers (@hpc-interactive)
"""

EXAMPLES = r"""
- name: Undo the session's controller side
  hpc.interactive.session_teardown:
    id: "{{ session_id }}"
    side: resource
    target: controller
    scheduler: local
    remote_dir: ~/.isession/sessions/{{ session_id }}
  delegate_to: controller

- name: Undo the session's workspace side
  hpc.interactive.session_teardown:
    id: "{{ session_id }}"
    side: workspace
    target: compute
    scheduler: slurm
    workspace_port: 23456
"""

RETURN = r"""
undone:
  description: What was undone (or would be, in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: ["job 4711", "tunnel isession-abc", "node port 30001"]
outcomes:
  description: One entry per resource kind looked at on this side - C(kind), C(side), C(undone), C(error), C(pending).
  returned: always
  type: list
  elements: dict
  sample: [{kind: job, side: resource, undone: ["job 4711"], error: "", pending: ""}]
pending:
  description: Kinds left for a later try, with why (a listener still on the workspace port); not a failure.
  returned: always
  type: list
  elements: str
  sample: ["workspace_port: a listener of alice is still on workspace port 23456 ..."]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hpc.interactive.plugins.module_utils._ports import DEFAULT_DIR
from ansible_collections.hpc.interactive.plugins.module_utils._teardown import (
    KINDS,
    Holding,
    errors,
    pending,
    scheduler_context,
    teardown,
)
from ansible_collections.hpc.interactive.plugins.module_utils._vocabulary import IdError, check_id

ARGUMENT_SPEC = dict(
    id=dict(type="str", required=True),
    side=dict(type="str", required=True, choices=["resource", "workspace"]),
    target=dict(type="str", choices=["workspace", "controller", "compute"]),
    scheduler=dict(type="str", choices=["slurm", "pbs", "sge", "local"]),
    remote_dir=dict(type="str"),
    workspace_port=dict(type="int"),
    skip=dict(type="list", elements="str", default=[]),
    pbs_flavor=dict(type="str", default="torque", choices=["torque", "pro"]),
    reservation_dir=dict(type="path", default=DEFAULT_DIR),
    timeout=dict(type="int", default=30),
    query_timeout=dict(type="int", default=10),
    scheduler_path=dict(type="list", elements="str", default=[]),
    scheduler_env=dict(type="dict", default={}),
)

MODULE_OPTIONS = dict(supports_check_mode=True)


def run_module(module: AnsibleModule) -> None:
    """The module's work; also run inside the Ansible worker by the action plugin of the same name."""
    p = module.params
    try:
        check_id(p["id"], "id")
    except IdError as exc:
        module.fail_json(msg=str(exc), field="id")
    port = p["workspace_port"]
    if port is not None and not 0 < port < 65536:
        module.fail_json(msg="workspace_port must be 1..65535, got %d" % port, field="workspace_port")
    unknown = sorted(set(p["skip"]) - {k.name for k in KINDS})
    if unknown:
        module.fail_json(msg="skip: unknown resource kinds %s" % ", ".join(unknown), field="skip")
    held = Holding(session_id=p["id"], target=p["target"], scheduler=p["scheduler"], remote_dir=p["remote_dir"],
                   workspace_port=port)
    try:
        ctx = scheduler_context(p["scheduler"], p["scheduler_path"], p["scheduler_env"],
                                resolve=module.get_bin_path, reservation_dir=p["reservation_dir"],
                                pbs_flavor=p["pbs_flavor"], timeout=p["timeout"], query_timeout=p["query_timeout"],
                                check=module.check_mode)
    except ValueError as exc:
        module.fail_json(msg=str(exc), field="scheduler_path")
    outcomes = teardown(held, p["side"], ctx, skip=p["skip"])
    result = dict(changed=any(o.changed for o in outcomes), undone=[u for o in outcomes for u in o.undone],
                  outcomes=[o.as_dict() for o in outcomes], pending=pending(outcomes))
    for why in result["pending"]:
        module.warn(why)
    problems = errors(outcomes)
    if problems:
        module.fail_json(msg="; ".join(problems), **result)
    module.exit_json(**result)


def main() -> None:
    run_module(AnsibleModule(argument_spec=ARGUMENT_SPEC, **MODULE_OPTIONS))


if __name__ == "__main__":
    main()
