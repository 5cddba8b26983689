# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations


class ModuleDocFragment:
    """Options of the modules that run a scheduler's commands (scheduler_submit, scheduler_job_info)."""

    DOCUMENTATION = r"""
options:
  scheduler_path:
    description:
      - Directories searched first for the scheduler's commands and put first on their C(PATH), for a scheduler
        whose commands are not on the non-login C(PATH) of an SSH connection (a site's C(/opt/sge/bin/lx-amd64)).
      - Absolute paths, without C(:).
    type: list
    elements: str
    default: []
  scheduler_env:
    description:
      - Environment variables for the scheduler's commands, for example C(SGE_ROOT) and C(SGE_CELL) for Grid
        Engine. Not for secrets. C(PATH) (use O(scheduler_path)) and the locale variables cannot be set.
    type: dict
    default: {}
"""
