#!/usr/bin/python
# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: service_json
short_description: Write a session's C(service.json) (URL, PORT, SLUG, JOB_STATUS, ERROR_MESSAGE)
version_added: 0.1.0
description:
  - Writes the seed's C(service.json) that tells the platform where a session answers
    (C(<URL>/<PORT>/<SLUG>)) and how its job is doing.
  - Validates every value, then merges it into the current file; keys not given are kept.
    Changing O(job_status) without O(error_message) resets C(ERROR_MESSAGE) to V("").
  - Writes atomically (temp file in the same directory, fsync, rename, fsync of the directory),
    so a reader polling the file never sees a partial one.
  - Output is stable - C(URL), C(PORT), C(SLUG), C(JOB_STATUS), C(ERROR_MESSAGE), then extra keys
    sorted; indent 4; trailing newline - so an unchanged content is C(changed=false).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
options:
  path:
    description: Path of the file. Its directory must exist.
    type: path
    required: true
  state:
    description: V(present) writes the file, V(absent) removes it (idempotent).
    type: str
    choices: [present, absent]
    default: present
  url:
    description: C(URL) - V(/me) for an http backend, V(/sme) for an https backend.
    type: str
    choices: [/me, /sme]
  port:
    description:
      - C(PORT) - the workspace-side port, 1..65535, as an integer or a string of digits.
      - Always written as a string of digits (V("56321")).
    type: raw
  slug:
    description:
      - C(SLUG) - the URL tail after C(<URL>/<PORT>/); V("") for none (written as V("") when never given).
      - "Allowed characters are letters, digits and C(- . _ ~ / ? # = & % + : @ ,). No whitespace,
        control characters, quotes, C(;), C($), backticks, parentheses or backslashes; no leading
        C(/) or C(-); no C(.) or C(..) path segment (also percent-encoded); C(%) only as C(%XX)."
      - A C(?query) or C(#fragment) may carry app options, but parameters named like secrets
        (password, token, secret, api key, auth, credential, signature) are refused -
        secrets never go into URLs.
    type: str
  job_status:
    description:
      - C(JOB_STATUS). V(Running) needs C(URL) and C(PORT), given now or already in the file.
    type: str
    choices: [Submitting, Queued, Starting, Running, Cancelled, Completed, Failed]
  error_message:
    description:
      - C(ERROR_MESSAGE) - words for the user, V("") for none.
      - Newlines are kept, CR/CRLF become newlines, a tab becomes a space, other control characters
        are escaped as C(\xNN); longer than 4096 characters is cut and ends with C( [truncated]).
    type: str
  extra:
    description:
      - Extra keys to set. Keys must not collide with the standard keys (in any case); values
        must be JSON-serialisable. A V(null) value removes that extra key.
    type: dict
  mode:
    description:
      - Mode of the file as an octal string (V('0600')); the owner must be able to read and write.
      - Symbolic modes are not supported.
    type: raw
    default: '0600'
  force:
    description:
      - When the current file is not valid JSON, not an object, or holds invalid values, the module
        fails unless this is V(true); then the file is rebuilt from the given options alone.
    type: bool
    default: false
author:
  - hpc.interactive developers (@hpc-interactive)
"""

EXAMPLES = r"""
- name: The job was submitted
  hpc.interactive.service_json:
    path: "{{ session_dir }}/service.json"
    url: /me
    port: "{{ wsport }}"
    slug: lab
    job_status: Submitting

- name: The app answers through the tunnel
  hpc.interactive.service_json:
    path: "{{ session_dir }}/service.json"
    job_status: Running

- name: The scheduler refused the job
  hpc.interactive.service_json:
    path: "{{ session_dir }}/service.json"
    job_status: Failed
    error_message: "sbatch: error: invalid partition specified: gpu"

- name: Remove it
  hpc.interactive.service_json:
    path: "{{ session_dir }}/service.json"
    state: absent
"""

RETURN = r"""
path:
  description: The path of the file.
  returned: always
  type: str
  sample: /home/wsuser/.local/state/isession/sessions/s1/service.json
content:
  description: The file's content after the task (predicted in check mode); V({}) for O(state=absent).
  returned: always
  type: dict
  sample:
    URL: /me
    PORT: "56321"
    SLUG: lab
    JOB_STATUS: Running
    ERROR_MESSAGE: ""
mode:
  description: The file's mode after the task, as an octal string.
  returned: when O(state=present)
  type: str
  sample: "0600"
"""

from contextlib import nullcontext

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hpc.interactive.plugins.module_utils._service_file import (
    JOB_STATUSES,
    URLS,
    Plan,
    ServiceFileError,
    apply,
    locked,
    parse_mode,
    plan_absent,
    plan_present,
    validate,
)


class ServiceJson:
    """Plan the change from the current file, report it, and apply it unless in check mode."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params

    def plan(self) -> Plan:
        path = self.params["path"]
        if self.params["state"] == "absent":
            return plan_absent(path)
        mode = parse_mode(self.params["mode"])
        updates = validate(
            url=self.params["url"],
            port=self.params["port"],
            slug=self.params["slug"],
            job_status=self.params["job_status"],
            error_message=self.params["error_message"],
            extra=self.params["extra"],
        )
        return plan_present(path, updates, mode=mode, force=self.params["force"])

    def run(self) -> None:
        path = self.params["path"]
        check = self.module.check_mode
        try:
            # writers serialise read-merge-write; check mode only reads
            with nullcontext() if check else locked(path):
                plan = self.plan()
                if not check:
                    apply(plan)
        except ServiceFileError as exc:
            self.module.fail_json(msg=exc.msg, field=exc.field, path=path)
        except OSError as exc:
            self.module.fail_json(msg=f"cannot write {path}: {exc}", field="path", path=path)
        result = {"changed": plan.changed, "path": path, "content": plan.content}
        if plan.mode is not None:
            result["mode"] = f"{plan.mode:04o}"
        if self.module._diff and plan.changed:
            result["diff"] = self.diff(plan)
        self.module.exit_json(**result)

    @staticmethod
    def diff(plan: Plan) -> dict:
        before_header = after_header = plan.path
        if plan.mode_changed:
            before_header = f"{plan.path} (mode {plan.old_mode or 0:04o})"
            after_header = f"{plan.path} (mode {plan.mode or 0:04o})"
        return {
            "before": plan.before_text or "",
            "after": plan.after_text or "",
            "before_header": before_header,
            "after_header": after_header,
        }


ARGUMENT_SPEC = dict(
    path=dict(type="path", required=True),
    state=dict(type="str", choices=["present", "absent"], default="present"),
    url=dict(type="str", choices=list(URLS)),
    port=dict(type="raw"),
    slug=dict(type="str"),
    job_status=dict(type="str", choices=list(JOB_STATUSES)),
    error_message=dict(type="str"),
    extra=dict(type="dict"),
    mode=dict(type="raw", default="0600"),
    force=dict(type="bool", default=False),
)

MODULE_OPTIONS = dict(supports_check_mode=True)


def run_module(module: AnsibleModule) -> None:
    """The module's work; also run inside the Ansible worker by the action plugin of the same name."""
    ServiceJson(module).run()


def main() -> None:
    run_module(AnsibleModule(argument_spec=ARGUMENT_SPEC, **MODULE_OPTIONS))


if __name__ == "__main__":
    main()
