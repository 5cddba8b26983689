#!/usr/bin/python
# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: scheduler_job_info
short_description: State of one or many batch jobs, with one scheduler call
version_added: 0.1.0
description:
  - Asks the scheduler once for all O(job_ids) (or for the jobs named O(job_name) of O(user)) and maps each job to
    one of C(queued), C(running), C(completed), C(failed), C(cancelled), C(timeout), C(undetermined).
  - Slurm - C(squeue --json) (fixed-format C(squeue -o) fallback); jobs squeue no longer lists are looked up with
    C(sacct) when accounting works. PBS - C(qstat -f -F json -x) (PBS Pro), else C(qstat -f) text (Torque, Slurm's
    wrappers). Grid Engine - C(qstat -xml). Local - the job records and C(/proc).
  - A scheduler that does not answer (timeout, connection error) makes every asked job C(undetermined) with
    RV(reachable=false); the module does not fail. A job the scheduler answered about but does not know is
    C(undetermined) with C(found=false) (absent). Only repeated confirmed absence should end a session.
extends_documentation_fragment: [ansible.builtin.action_common_attributes, hpc.interactive.scheduler_env]
attributes:
  check_mode: {support: full, details: read-only}
  diff_mode: {support: none}
  platform: {platforms: posix}
options:
  scheduler: {description: Which scheduler., type: str, required: true, choices: [slurm, pbs, sge, local]}
  job_ids: {description: Jobs to report., type: list, elements: str}
  job_name: {description: Report the jobs with this name instead of O(job_ids)., type: str}
  user: {description: Owner of the jobs for O(job_name) (default the connecting user)., type: str}
  timeout: {description: Seconds before the scheduler counts as not answering., type: int, default: 10}
  queue_details:
    description:
      - For the asked jobs that are queued, also ask where they wait (one more scheduler call) and return
        C(queue_position), C(queue_pending) and C(start_time) of each queued job in RV(jobs).
      - Slurm only (C(squeue --states=PENDING)); other schedulers return them as V(null).
    type: bool
    default: false
    version_added: 0.1.0
author: [hpc.interactive developers (@hpc-interactive)]
"""

EXAMPLES = r"""
- name: Ask for two jobs at once
  hpc.interactive.scheduler_job_info:
    scheduler: slurm
    job_ids: ["4711", "4712"]
  register: info

- name: Fail unless running
  ansible.builtin.assert:
    that: info.jobs['4711'].state == 'running'
"""

RETURN = r"""
jobs:
  description:
    - Per job id - C(state), C(raw_state) (the scheduler's word), C(nodes), C(reason) (why it waits or ended),
      C(exit_code), C(name), C(user), C(found).
    - With O(queue_details), each queued job also has C(queue_position) (1 for the job that starts next among
      the jobs waiting in its partition), C(queue_pending) (how many wait there) and C(start_time) (the
      scheduler's estimated start, epoch seconds); each V(null) when the scheduler does not say.
  returned: always
  type: dict
  sample:
    "4711": {state: running, raw_state: RUNNING, nodes: [compute1], reason: "", exit_code: null,
             name: isession-abc, user: alice, found: true}
    "4712": {state: queued, raw_state: PENDING, nodes: [], reason: Resources, exit_code: null,
             name: isession-def, user: alice, found: true, queue_position: 1, queue_pending: 2,
             start_time: 1796476800}
reachable: {description: Whether the scheduler answered., returned: always, type: bool, sample: true}
error: {description: Why the scheduler did not answer., returned: always, type: str, sample: ""}
"""

import os
import pwd

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hpc.interactive.plugins.module_utils import _directives as D
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._registry import SCHEDULERS, get_backend
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._runtime import make_runner, scheduler_setup


class SchedulerJobInfo:
    def __init__(self, module: AnsibleModule):
        self.module = module
        self.p = module.params
        self.backend = get_backend(self.p["scheduler"])
        try:
            path, env = scheduler_setup(self.p["scheduler_path"], self.p["scheduler_env"])
        except ValueError as exc:
            module.fail_json(msg=str(exc))
        self.runner = make_runner(module.get_bin_path, path, env)

    def run(self):
        p = self.p
        ids = [str(j) for j in p["job_ids"] or []]
        for job_id in ids:
            if not D.JOB_ID.match(job_id):
                self.module.fail_json(msg="job_ids: %r is not a job id" % job_id)
        user = p["user"] or pwd.getpwuid(os.getuid()).pw_name
        try:
            D.check_name("user", user)
            if p["job_name"]:
                D.check_name("job_name", p["job_name"], job_name=True)
        except ValueError as exc:
            self.module.fail_json(msg=str(exc))
        if ids:
            result = self.backend.query(self.runner, job_ids=ids, timeout=p["timeout"])
        else:
            result = self.backend.query(self.runner, name=p["job_name"], user=user, timeout=p["timeout"])
        jobs = {job_id: info.as_dict() for job_id, info in result.jobs.items()}
        queued = [job_id for job_id, info in result.jobs.items() if info.state == "queued"]
        if p["queue_details"] and queued:
            details = self.backend.queue_details(self.runner, queued, timeout=p["timeout"])
            for job_id in queued:
                jobs[job_id].update(details.get(job_id) or
                                    {"queue_position": None, "queue_pending": None, "start_time": None})
        self.module.exit_json(changed=False, jobs=jobs, reachable=result.reachable, error=result.error)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            scheduler=dict(type="str", required=True, choices=list(SCHEDULERS)),
            job_ids=dict(type="list", elements="str"),
            job_name=dict(type="str"),
            user=dict(type="str"),
            timeout=dict(type="int", default=10),
            queue_details=dict(type="bool", default=False),
            scheduler_path=dict(type="list", elements="str", default=[]),
            scheduler_env=dict(type="dict", default={}),
        ),
        mutually_exclusive=[("job_ids", "job_name")],
        required_one_of=[("job_ids", "job_name")],
        supports_check_mode=True,
    )
    SchedulerJobInfo(module).run()


if __name__ == "__main__":
    main()
