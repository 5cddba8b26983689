# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Scheduler backends behind one interface (see ``_base.Backend``); ``get_backend(name)`` picks one.

The package's ``__init__.py`` stays empty (ansible-test's empty-init rule): the registry lives here.
"""
from __future__ import annotations

from typing import Any

from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._base import Backend
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers.local import Local
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers.pbs import Pbs
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers.sge import Sge
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers.slurm import Slurm

SCHEDULERS = ("slurm", "pbs", "sge", "local")


def get_backend(name: str, **kwargs: Any) -> Backend:
    if name == "slurm":
        return Slurm()
    if name == "pbs":
        return Pbs(flavor=kwargs.get("pbs_flavor") or "torque")
    if name == "sge":
        return Sge()
    if name == "local":
        return Local(state_dir=kwargs.get("state_dir"))
    raise ValueError("scheduler: unknown scheduler %r (one of %s)" % (name, ", ".join(SCHEDULERS)))
