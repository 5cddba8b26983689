# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filter ``hpc.interactive.vnc_password``: a session's VNC password from its secret (docs: vnc_password.yml)."""
from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.hpc.interactive.plugins.module_utils._desktop import DisplayError, vnc_password


def _vnc_password(secret):
    if not isinstance(secret, str):
        raise AnsibleFilterError("vnc_password: the secret must be a string")
    try:
        return vnc_password(secret)
    except DisplayError as exc:
        raise AnsibleFilterError(f"vnc_password: {exc}") from None


class FilterModule:
    """hpc.interactive filters."""

    def filters(self):
        return {"vnc_password": _vnc_password}
