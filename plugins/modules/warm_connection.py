#!/usr/bin/python
# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: warm_connection
short_description: Open the task host's SSH master connection in the background
version_added: 0.2.0
description:
  - Starts, and does not wait for, the SSH command that the task host's C(ansible.builtin.ssh) connection would run,
    so that its master connection (C(ControlMaster=auto) with C(ControlPersist), ansible-core's default C(ssh_args))
    is open by the time a later task needs it. A session's start uses it first thing, so that the handshake with the
    cluster's controller happens while the play still does its local steps instead of delaying the job's submission.
  - The command is built by the connection plugin itself, with the host's user, port, key, options and
    C(ControlPath), so later tasks reuse exactly this master. It runs detached, with no terminal and no input, so it
    can never wait for a prompt.
  - Best effort, never fails on the connection - when the connection is not ssh, needs a password or a private key
    handed to an ssh-agent, or keeps no master, it does nothing and says why in RV(msg); when the handshake fails,
    the next task connects (and reports the error) as it would have anyway.
  - With O(modules), it also builds those modules' payloads ahead, in a background process - the C(AnsiballZ)
    payload that ansible-core builds the first time a run ships a module to a host (about 0.15-0.2 s for a module
    with many module_utils) and keeps in the run's cache for later tasks. The later task that ships the module to
    this host then finds its payload built. Best effort too - a build that fails leaves the task to build it as usual.
  - An action plugin only; there is nothing to run on the host.
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Opens no connection in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  modules:
    description:
      - Fully qualified names of the modules that later tasks ship to this host, whose payloads to build ahead in the
        background (the run's own cache, so only later tasks of the same run gain).
      - Nothing is built in check mode.
    type: list
    elements: str
    default: []
    version_added: 0.2.0
notes:
  - Use it with C(delegate_to) naming the host whose connection to open.
author: [hpc.interactive developers (@hpc-interactive)]
"""

EXAMPLES = r"""
- name: Open the connection to the controller while the local steps run
  hpc.interactive.warm_connection:
  delegate_to: "{{ session_resource }}"

- name: Also build the payload of the module that the submit ships there
  hpc.interactive.warm_connection:
    modules: [hpc.interactive.scheduler_submit]
  delegate_to: "{{ session_resource }}"
"""

RETURN = r"""
started: {description: Whether the SSH command was started., returned: always, type: bool, sample: true}
prepared:
  description: The modules whose payloads are being built in the background (empty when none could be).
  returned: always
  type: list
  elements: str
  sample: [hpc.interactive.scheduler_submit]
msg: {description: "What was done, or why nothing was.", returned: always, type: str,
      sample: opening the ssh master connection in the background}
"""
