# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The words of a session, in one place: its steps, the JOB_STATUS values and the table between them,
and the session id's pattern with its one length limit.

Private to the hpc.interactive collection: no compatibility promise outside it. Standard library only.
The record (``_state``), service.json (``_service_file``), the modules, the ``isession`` CLI and its
watcher import these names; the roles read them through the ``hpc.interactive.session_vocabulary``
lookup. Nothing else defines them.

Steps (``state.json``), in the order a start reaches them::

    created -> ports_reserved -> submitted -> queued -> starting -> running -> cancelled | completed | failed

A non-terminal step may follow any other (a requeued job goes from running back to queued); a
terminal step is final. Each step shows as one JOB_STATUS in ``service.json`` (:data:`STATUS_OF_STEP`):
the platform connects when it says ``Running``, shows ``ERROR_MESSAGE`` when ``Failed``, and a loading
page with the status otherwise.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Tuple

STEPS: Tuple[str, ...] = ("created", "ports_reserved", "submitted", "queued", "starting", "running",
                          "cancelled", "completed", "failed")
TERMINAL_STEPS: Tuple[str, ...] = ("cancelled", "completed", "failed")
# steps of a session whose job or agent may exist: the watcher follows these
LIVE_STEPS: Tuple[str, ...] = ("submitted", "queued", "starting", "running")

JOB_STATUSES: Tuple[str, ...] = ("Submitting", "Queued", "Starting", "Running", "Cancelled", "Completed", "Failed")
TERMINAL_STATUSES: Tuple[str, ...] = ("Cancelled", "Completed", "Failed")

# The JOB_STATUS a step shows (service.json not written yet, or written before the step changed).
STATUS_OF_STEP: Dict[str, str] = {
    "created": "Submitting", "ports_reserved": "Submitting", "submitted": "Submitting",
    "queued": "Queued", "starting": "Starting", "running": "Running",
    "cancelled": "Cancelled", "completed": "Completed", "failed": "Failed",
}
# The step a JOB_STATUS is recorded as (Submitting has no step of its own: it is before any job).
STEP_OF_STATUS: Dict[str, str] = {status: step for step, status in STATUS_OF_STEP.items() if status != "Submitting"}

# A session id names the session directory, the job (``isession-<id>``, at most 64 characters, which every
# scheduler accepts) and the port reservations: letters, digits, ``.``, ``_`` and ``-``, starting with a
# letter or digit.
JOB_NAME_PREFIX = "isession-"
ID_MAX_LENGTH = 64 - len(JOB_NAME_PREFIX)
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,%d}" % (ID_MAX_LENGTH - 1)
ID_RE = re.compile(ID_PATTERN + r"\Z")
ID_RULE = "1-%d characters of [A-Za-z0-9._-] starting with a letter or digit" % ID_MAX_LENGTH


class IdError(ValueError):
    """A refused session id; the message names the input."""


def check_id(value: Any, field: str = "session_id") -> str:
    """``value`` if it is a valid session id, else :class:`IdError` naming ``field``."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise IdError("%s must be %s, got %r" % (field, ID_RULE, value))
    return value


def job_name(session_id: str) -> str:
    """The scheduler job name of a session (also the name of its controller-side tunnel)."""
    return JOB_NAME_PREFIX + session_id


def as_dict() -> Dict[str, Any]:
    """Everything above as plain data, for the ``session_vocabulary`` lookup and documentation."""
    return {
        "steps": list(STEPS), "terminal_steps": list(TERMINAL_STEPS), "live_steps": list(LIVE_STEPS),
        "job_statuses": list(JOB_STATUSES), "terminal_statuses": list(TERMINAL_STATUSES),
        "status_of_step": dict(STATUS_OF_STEP), "step_of_status": dict(STEP_OF_STATUS),
        "id_pattern": "^" + ID_PATTERN + "$", "id_max_length": ID_MAX_LENGTH, "id_rule": ID_RULE,
        "job_name_prefix": JOB_NAME_PREFIX,
    }
