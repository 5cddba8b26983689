# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
name: session_vocabulary
author:
  - hpc.interactive developers (@hpc-interactive)
version_added: 0.1.0
short_description: The words of an hpc.interactive session (steps, JOB_STATUS values, the session id rule)
description:
  - Returns the session vocabulary that the collection's modules, the C(isession) CLI and its watcher share,
    so that a role checks a session id or a step against the same definition instead of a copy.
  - Without a term it returns the whole vocabulary as one dictionary; with terms, the named entries.
options:
  _terms:
    description:
      - Names of entries to return (V(steps), V(terminal_steps), V(live_steps), V(job_statuses),
        V(terminal_statuses), V(status_of_step), V(step_of_status), V(id_pattern), V(id_max_length),
        V(id_rule), V(job_name_prefix)). None returns the whole dictionary.
    type: list
    elements: str
    required: false
"""

EXAMPLES = r"""
- name: Refuse a session id the collection would refuse
  ansible.builtin.assert:
    that: session_id is match(lookup('hpc.interactive.session_vocabulary', 'id_pattern'))
    fail_msg: "session_id must be {{ lookup('hpc.interactive.session_vocabulary', 'id_rule') }}"

- name: Is the session over?
  ansible.builtin.debug:
    msg: "{{ record.step in lookup('hpc.interactive.session_vocabulary', 'terminal_steps') }}"
"""

RETURN = r"""
_raw:
  description:
    - The whole vocabulary (a dictionary) when no term is given; otherwise one value per term.
  type: raw
"""

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

from ansible_collections.hpc.interactive.plugins.module_utils._vocabulary import as_dict


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        words = as_dict()
        if not terms:
            return [words]
        unknown = [t for t in terms if t not in words]
        if unknown:
            raise AnsibleLookupError("unknown session_vocabulary entries %s (known: %s)"
                                     % (", ".join(map(str, unknown)), ", ".join(sorted(words))))
        # a list value must stay one value: lookup() would otherwise join the elements with commas
        return [words[t] for t in terms]
