# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The test ``hpc.interactive.plain_command``: a plain path or command name (docs: plain_command.yml).

The rule is ``plugin_utils/_plain.py``'s, the one ``hpc.interactive.vnc_input_errors`` applies too.
"""
from __future__ import annotations

from ansible_collections.hpc.interactive.plugins.plugin_utils._plain import is_plain


class TestModule:
    """hpc.interactive tests."""

    def tests(self):
        return {"plain_command": is_plain}
