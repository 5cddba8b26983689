# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Runs the session_wait module inside the Ansible worker on a local connection (see plugin_utils/_inprocess.py)."""

from __future__ import annotations

from ansible_collections.hpc.interactive.plugins.plugin_utils._inprocess import InProcessAction


class ActionModule(InProcessAction):
    MODULE = "session_wait"
