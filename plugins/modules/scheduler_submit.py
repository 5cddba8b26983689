#!/usr/bin/python
# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: scheduler_submit
short_description: Render, submit or cancel a batch job (Slurm, PBS, Grid Engine or a detached local process)
version_added: 0.1.0
description:
  - Renders a batch script from O(script) or O(script_file), typed options and free-form O(directives), plus the
    enforced directives and limits of the site file C(/etc/isession/site.yml) on the target host, and submits it.
  - The site file is not an option. It is honoured only when it and its directory are owned by root and not
    group/world writable; a site file that exists but fails that check makes the module fail (nothing submitted).
  - Enforced directives replace the user's directives for the same option and are rendered last. Site limits
    (C(max_walltime), C(allowed_queues), C(max_nodes), ...) are checked on the effective directives.
  - O(state=present) with a O(job_name) that already has a queued or running job of this user does not submit again.
    After a submit that timed out, the job is looked up by name before the module reports a failure.
  - The rendered script is stored by the scheduler; it must never hold secrets. Environment variables whose names look
    like secrets (TOKEN, PASSWORD, SECRET, API_KEY, ...) are refused; put secrets in 0600 files the job reads.
  - O(scheduler=local) runs the script detached (new session) on the target host; the job id is its process group id.
extends_documentation_fragment: [ansible.builtin.action_common_attributes, hpc.interactive.scheduler_env]
attributes:
  check_mode: {support: full, details: "Renders and validates; submits, writes and cancels nothing."}
  diff_mode: {support: full, details: "The script file before and after."}
  platform: {platforms: posix}
options:
  scheduler:
    description: "Which scheduler."
    type: str
    required: true
    choices: [slurm, pbs, sge, local]
  state:
    description: "V(present) submits, V(absent) cancels."
    type: str
    default: present
    choices: [present, absent]
  job_name:
    description: "Unique name of the job for this user; required for O(state=present)."
    type: str
  job_id:
    description: "Job to cancel with O(state=absent)."
    type: str
  script:
    description: "Body of the batch script (text)."
    type: str
  script_file:
    description: "Path of a file on the target holding the body of the batch script."
    type: path
  return_script:
    description:
      - Whether the result carries the rendered script (RV(script)) and O(script) itself (in C(invocation), the
        arguments ansible-core reports back with every result). When false, C(invocation) has the length of
        O(script) in its place.
      - A long script costs every run its way back from the host, in the result and in every callback that records
        it (a session's agent script, which ships the collection's helpers inside it, is about 100 KB, and it came
        back twice). Set it to false when only the job matters; the diff mode still shows the script.
    type: bool
    default: true
    version_added: 0.2.0
  script_path:
    description:
      - "Where the rendered script is written (mode 0700)."
      - "Default C(<workdir>/<job_name>.sh), the home directory without O(workdir)."
    type: path
  workdir:
    description:
      - "Working directory of the job. Made when it does not exist, with its missing parents, each mode 0700."
    type: path
  private_workdir:
    description:
      - "O(workdir) is the session's own directory: it is made exclusively (mode 0700) and refused, before anything is
        written or submitted, when it already exists and is not the user's own with mode 0700 (another user may have
        put code in it), or when a directory or symlink on its path belongs to another user than root or the user, or
        is writable by others without the sticky bit (they could put their own directory there)."
    type: bool
    default: false
  output:
    description: "Standard output path (scheduler patterns like C(%j) allowed; C(~) is expanded)."
    type: path
  error:
    description: "Standard error path (C(~) is expanded)."
    type: path
  secret:
    description:
      - "A secret the job reads (for example the session token), written to O(secret_path) with mode 0600 before
        the job is submitted, so that it travels in this module's arguments (piped, never in argv) instead of
        a separate copy. Never logged or returned, and never put into the job script."
      - "Nothing is written when a job of that name is already alive."
    type: str
  secret_path:
    description: "Where O(secret) is written (mode 0600; missing directories are made with mode 0700)."
    type: path
  queue:
    description: "Queue or partition."
    type: str
    aliases: [partition]
  walltime:
    description: "Minutes, C(HH:MM:SS) or C(D-HH:MM:SS)."
    type: str
  nodes:
    description: "Number of nodes."
    type: int
  ntasks:
    description: "Number of tasks."
    type: int
  cpus_per_task:
    description: "CPUs per task."
    type: int
  memory:
    description: "Memory per node, for example C(512M) or C(4G)."
    type: str
  gpus:
    description: "Number of GPUs."
    type: int
  account:
    description: "Account to charge."
    type: str
  qos:
    description: "Quality of service (Slurm)."
    type: str
  constraint:
    description: "Node features (Slurm)."
    type: str
  exclusive:
    description: "Whole nodes."
    type: bool
    default: false
  reservation:
    description: "Reservation name."
    type: str
  environment:
    description: "Variables exported by the script (values shell-quoted, single line; secret-looking names refused)."
    type: dict
  directives:
    description:
      - "Extra scheduler options, one per item, for example C(--comment=x)."
      - "Each must start with C(-); no newlines, quotes, backslashes or C($ ` ; | & < >)."
      - "Each is one option and its value, and must be allowed by the directive policy: options that set what a typed
        option sets (account, queue, walltime, job name, output, resources) are refused naming the option to use;
        options that change the user or group, that export loader variables (C(LD_*), C(PYTHONPATH), ...) or import
        an unchecked environment are refused; anything else must be on the scheduler's allowlist, which the site
        file extends (C(allow_directives)), narrows (C(deny_directives)) or replaces (C(allowed_directives))."
      - "Directives the site enforces for the same option are dropped before the policy is asked (the site wins)."
    type: list
    elements: str
    default: []
  input_names:
    description:
      - "What the caller's user typed for each option, for refusals: C({queue: session_partition, directives:
        session_directives}) makes a refused partition read C(session_partition: ...) instead of C(queue: ...)."
      - "An empty name says the caller sets that option itself (a directive setting it is refused with \"the session
        sets it itself\")."
    type: dict
    default: {}
  pbs_flavor:
    description: "How PBS resources are written, C(nodes=) (torque) or C(select=) (pro)."
    type: str
    default: torque
    choices: [torque, pro]
  wait_for:
    description: "Wait until the job is at least queued, or running."
    type: str
    choices: [queued, running]
  wait_timeout:
    description: "Seconds to wait for O(wait_for)."
    type: int
    default: 60
  submit_timeout:
    description: "Seconds before a submit or cancel command counts as timed out."
    type: int
    default: 30
  query_timeout:
    description: "Seconds before a query counts as timed out."
    type: int
    default: 10
author: [hpc.interactive developers (@hpc-interactive)]
"""

EXAMPLES = r"""
- name: Submit a Jupyter job to Slurm and wait until it runs
  hpc.interactive.scheduler_submit:
    scheduler: slurm
    job_name: isession-abc123
    workdir: /home/alice/isession/abc123
    partition: debug
    walltime: "01:00:00"
    cpus_per_task: 4
    memory: 8G
    directives: ["--comment=isession"]
    script: |
      exec ./agent.sh
    wait_for: running
  register: job

- name: Cancel it
  hpc.interactive.scheduler_submit:
    scheduler: slurm
    state: absent
    job_id: "{{ job.job_id }}"
"""

RETURN = r"""
job_id: {description: The job's id (process group id for local)., returned: when a job exists or was submitted,
         type: str, sample: "4711"}
state: {description: "queued, running, completed, failed, cancelled, timeout or undetermined.", returned: always,
        type: str, sample: running}
nodes: {description: "Hosts the job runs on, when known.", returned: always, type: list, elements: str,
        sample: [compute1]}
reason: {description: "The scheduler's reason for a job still queued (e.g. C(Resources)), when it gave one.",
         returned: state=present and a job was submitted, type: str, sample: Resources}
script_path: {description: Where the rendered script was (or would be) written., returned: state=present, type: str,
              sample: /home/alice/isession/abc123/isession-abc123.sh}
workdir: {description: "O(workdir) with C(~) expanded on the host that runs the job, when given.",
          returned: state=present and O(workdir) given, type: str, sample: /home/alice/isession/abc123}
script: {description: The rendered script., returned: state=present and O(return_script), type: str,
         sample: "#!/bin/bash\n#SBATCH ..."}
removed_directives: {description: User directives dropped because the site enforces that option.,
                     returned: state=present, type: list, elements: str, sample: ["--comment=mine"]}
cancelled: {description: The job ids cancelled (or that would be cancelled in check mode).,
            returned: state=absent and a job was alive, type: list, elements: str, sample: ["4711"]}
"""

import os
import pwd
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hpc.interactive.plugins.module_utils import _directives as D
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._registry import SCHEDULERS, get_backend
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._base import describe_failure
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._runtime import (
    make_runner,
    make_session_dir,
    read_text,
    scheduler_setup,
    wait_for_state,
    write_atomic,
)

LOOKUPS_AFTER_TIMEOUT = 3  # a timed-out submit may still create the job a moment later
LOOKUP_PAUSE = 1.0

ARGUMENT_SPEC = dict(
    scheduler=dict(type="str", required=True, choices=list(SCHEDULERS)),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    job_name=dict(type="str"), job_id=dict(type="str"),
    script=dict(type="str"), script_file=dict(type="path"), script_path=dict(type="path"),
    workdir=dict(type="path"), private_workdir=dict(type="bool", default=False),
    output=dict(type="path"), error=dict(type="path"),
    secret=dict(type="str", no_log=True), secret_path=dict(type="path"),
    queue=dict(type="str", aliases=["partition"]), walltime=dict(type="str"),
    nodes=dict(type="int"), ntasks=dict(type="int"), cpus_per_task=dict(type="int"), memory=dict(type="str"),
    gpus=dict(type="int"), account=dict(type="str"), qos=dict(type="str"), constraint=dict(type="str"),
    exclusive=dict(type="bool", default=False), reservation=dict(type="str"), environment=dict(type="dict"),
    directives=dict(type="list", elements="str", default=[]), input_names=dict(type="dict", default={}),
    pbs_flavor=dict(type="str", default="torque", choices=["torque", "pro"]),
    wait_for=dict(type="str", choices=["queued", "running"]), wait_timeout=dict(type="int", default=60),
    return_script=dict(type="bool", default=True),
    submit_timeout=dict(type="int", default=30), query_timeout=dict(type="int", default=10),
    scheduler_path=dict(type="list", elements="str", default=[]), scheduler_env=dict(type="dict", default={}),
)


def make_private_dirs(directory: str) -> None:
    """Make ``directory`` and its missing parents, each with mode 0700 (os.makedirs gives parents the umask's)."""
    if not directory or os.path.isdir(directory):
        return
    make_private_dirs(os.path.dirname(os.path.abspath(directory)))
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise


def short_invocation(params: dict) -> dict:
    """The result's ``invocation`` (the arguments ansible-core reports back) with O(script) replaced by its length."""
    args = dict(params)
    if isinstance(args.get("script"), str):
        args["script"] = "(%d characters, not returned: return_script is false)" % len(args["script"])
    return {"module_args": args}


class SchedulerSubmit:
    def __init__(self, module: AnsibleModule):
        self.module = module
        self.p = module.params
        self.script_path = ""  # set once the rendered script is written, reported with any later failure
        # every result (AnsibleModule adds the arguments as `invocation` unless given one) without the script: a long
        # script would otherwise come back twice, which every callback of the run then records
        self.invocation = None if self.p["return_script"] else short_invocation(self.p)
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.backend = get_backend(self.p["scheduler"], pbs_flavor=self.p["pbs_flavor"])
        try:
            path, env = scheduler_setup(self.p["scheduler_path"], self.p["scheduler_env"])
        except ValueError as exc:
            self.fail(str(exc))
        self.runner = make_runner(module.get_bin_path, path, env)
        self.local = self.p["scheduler"] == "local"

    def exit(self, **kw):
        if self.invocation is not None:
            kw.setdefault("invocation", self.invocation)
        self.module.exit_json(**kw)

    def fail(self, msg: str, **kw):
        if self.script_path:
            kw.setdefault("script_path", self.script_path)
        if self.invocation is not None:
            kw.setdefault("invocation", self.invocation)
        self.module.fail_json(msg=msg, **kw)

    def query_one(self, job_id: str):
        return self.backend.query(self.runner, job_ids=[job_id], timeout=self.p["query_timeout"]).jobs.get(job_id)

    def find_alive(self):
        found = self.backend.find_by_name(self.runner, self.p["job_name"], self.user, timeout=self.p["query_timeout"])
        if not found.reachable:
            self.fail("scheduler did not answer (%s); not submitting to avoid a duplicate job" % found.error)
        return found.jobs

    def render(self):
        p = self.p
        try:
            opts = D.normalise_options(p)
            script_path = p["script_path"] or os.path.join(opts.workdir or pwd.getpwuid(os.getuid()).pw_dir,
                                                           "%s.sh" % opts.job_name)
            D.check_path("script_path", script_path)
            body = p["script"]
            if p["script_file"] is not None:
                body = read_text(p["script_file"])
                if body is None:
                    self.fail("script_file: cannot read %s" % p["script_file"])
            policy = D.load_site_policy(p["scheduler"], D.DEFAULT_SITE_FILE)
            rendered = D.render_script(self.backend, opts, body, directives=p["directives"],
                                       environment=p["environment"], policy=policy)
        except D.DirectiveError as exc:
            self.fail(exc.render(p["input_names"]))
        except (ValueError, OSError) as exc:
            self.fail(str(exc))
        return opts, script_path, rendered

    def present(self):
        opts, script_path, rendered = self.render()
        result = dict(changed=False, script_path=script_path, removed_directives=rendered.removed,
                      state="undetermined", nodes=[])
        if self.p["return_script"]:
            result["script"] = rendered.text
        if opts.workdir:
            result["workdir"] = opts.workdir
        alive = self.find_alive()
        if alive:
            info = sorted(alive.values(), key=lambda i: i.job_id)[0]
            result.update(job_id=info.job_id, state=info.state, nodes=info.nodes)
            self.exit(**result)
        before = read_text(script_path)
        if self.module._diff and before != rendered.text:
            result["diff"] = dict(before=before or "", after=rendered.text, before_header=script_path,
                                  after_header=script_path)
        result["changed"] = True
        self.check_private_workdir(opts)
        if self.module.check_mode:
            self.exit(**result)
        self.prepare_files(opts, script_path)
        try:
            write_atomic(script_path, rendered.text, 0o700)
        except (OSError, ValueError) as exc:  # ValueError: the path is a directory
            self.fail("script_path: cannot write %s: %s" % (script_path, exc))
        self.script_path = script_path
        job_id = self.submit(script_path, opts)
        # with wait_for, wait_for_state's first query is immediate: no separate one
        info = None if self.p["wait_for"] else self.query_one(job_id)
        if self.p["wait_for"]:
            info, ok, why = wait_for_state(self.backend, self.runner, job_id, self.p["wait_for"],
                                           self.p["wait_timeout"], query_timeout=self.p["query_timeout"])
            if not ok:
                result.update(job_id=job_id, state=info.state, nodes=info.nodes)
                self.fail(why, **result)
        if info is not None:
            result.update(state=info.state, nodes=info.nodes,
                          reason="" if info.reason in (None, "None", "none") else info.reason)
        result["job_id"] = job_id
        self.exit(**result)

    def check_private_workdir(self, opts) -> None:
        """Refuse a session directory another user could have prepared (also in check mode); make it exclusively."""
        if not self.p["private_workdir"]:
            return
        if not opts.workdir:
            self.fail("private_workdir: needs workdir")
        try:
            make_session_dir(opts.workdir, os.geteuid(), check=self.module.check_mode)
        except ValueError as exc:
            self.fail(str(exc))
        except OSError as exc:
            self.fail("workdir: cannot make the directory %s: %s" % (opts.workdir, exc))

    def prepare_files(self, opts, script_path: str) -> None:
        """Make the job's directories (0700) and write the secret (0600) before anything is submitted."""
        for field, directory in (("workdir", opts.workdir), ("script_path", os.path.dirname(script_path)),
                                 ("secret_path", os.path.dirname(self.p["secret_path"] or ""))):
            try:
                make_private_dirs(directory)
            except OSError as exc:
                self.fail("%s: cannot make the directory %s: %s" % (field, directory, exc))
        if self.p["secret_path"]:
            try:
                write_atomic(self.p["secret_path"], self.p["secret"], 0o600)
            except (OSError, ValueError) as exc:
                self.fail("secret_path: cannot write %s: %s" % (self.p["secret_path"], exc))

    def submit(self, script_path: str, opts) -> str:
        if self.local:
            try:
                return self.backend.submit(script_path, self.p["job_name"], self.user, opts.output, opts.error)
            except OSError as exc:
                self.fail("local submit failed: %s" % exc)
        res = self.runner(self.backend.submit_argv(script_path), self.p["submit_timeout"])
        if res.ok:
            try:
                return self.backend.parse_submit(res.stdout)
            except ValueError as exc:
                self.fail(str(exc), rc=res.rc, stdout=res.stdout, stderr=res.stderr)
        # Ambiguous (timeout, lost reply): the job may exist. Look it up by its unique name, never resubmit.
        name = self.p["job_name"]
        found = None
        for attempt in range(LOOKUPS_AFTER_TIMEOUT if res.timed_out else 1):
            if attempt:
                time.sleep(LOOKUP_PAUSE)
            found = self.backend.find_by_name(self.runner, name, self.user, self.p["query_timeout"])
            if found.jobs:
                return sorted(found.jobs)[0]
        command = os.path.basename(res.argv[0]) if res.argv else "submit"
        if res.timed_out:
            why = "%s timed out after %ss" % (command, self.p["submit_timeout"])
            if found is not None and not found.reachable:
                why += " and the scheduler did not answer the lookup by name (%s); the job may exist" % found.error
            else:
                why += " and no job named %s appeared; not submitting again" % name
        else:
            why = "%s failed: %s" % (command, describe_failure(res))
        self.fail(why, rc=res.rc, stdout=res.stdout, stderr=res.stderr, timed_out=res.timed_out)
        return ""

    def absent(self):
        p = self.p
        if p["job_id"] and not D.JOB_ID.match(p["job_id"]):
            self.fail("job_id: %r is not a job id" % p["job_id"])
        if p["job_name"]:
            try:
                D.check_name("job_name", p["job_name"], job_name=True)
            except ValueError as exc:
                self.fail(str(exc))
        if p["job_id"]:
            res = self.backend.query(self.runner, job_ids=[p["job_id"]], timeout=p["query_timeout"])
            jobs = {k: v for k, v in res.jobs.items() if v.alive}
        else:
            res = self.backend.find_by_name(self.runner, p["job_name"], self.user, timeout=p["query_timeout"])
            jobs = res.jobs
        if not res.reachable:
            self.fail("scheduler did not answer (%s); cannot tell whether the job is alive" % res.error)
        if not jobs:
            info = res.jobs.get(p["job_id"] or "")
            self.exit(changed=False, job_id=p["job_id"], state=info.state if info else "undetermined", nodes=[])
        if not self.module.check_mode:
            for job_id in sorted(jobs):
                if self.local:
                    self.backend.cancel(job_id=job_id)
                    continue
                out, failed = self.backend.cancel_checked(self.runner, job_id, p["submit_timeout"], p["query_timeout"])
                if failed:
                    self.fail("cancel of job %s failed" % job_id, rc=out.rc, stdout=out.stdout, stderr=out.stderr)
        self.exit(changed=True, job_id=",".join(sorted(jobs)), state="cancelled", nodes=[], cancelled=sorted(jobs))


MODULE_OPTIONS = dict(
    mutually_exclusive=[("script", "script_file"), ("job_id", "job_name")],
    required_together=[("secret", "secret_path")],
    required_if=[("state", "present", ("job_name",)), ("state", "present", ("script", "script_file"), True),
                 ("state", "absent", ("job_id", "job_name"), True)],
    supports_check_mode=True,
)


def run_module(module: AnsibleModule) -> None:
    """The module's work; also run inside the Ansible worker by the action plugin of the same name."""
    runner = SchedulerSubmit(module)
    if module.params["state"] == "present":
        runner.present()
    else:
        runner.absent()


def main() -> None:
    run_module(AnsibleModule(argument_spec=ARGUMENT_SPEC, **MODULE_OPTIONS))


if __name__ == "__main__":
    main()
