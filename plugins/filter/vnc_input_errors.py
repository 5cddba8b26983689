# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filter ``hpc.interactive.vnc_input_errors``: what is wrong with a desktop session's inputs (docs:
vnc_input_errors.yml).

The vnc role (and desktop_app and matlab, built on it) hands these messages to the session role in its spec's
``input_errors``, which fails the session with them before anything is submitted. Each message names the field and
never repeats its value. The checks are what reaches the agent script: its values are quoted there, and these keep
out what would still break it (a newline in an argv word, an option where a path belongs).
"""
from __future__ import annotations

import re
from typing import Any, List, Mapping

from ansible.errors import AnsibleFilterError

from ansible_collections.hpc.interactive.plugins.plugin_utils._plain import PLAIN, is_plain

# argv words that may reach the agent script: no newline, NUL, ;, $ or backtick
WORD = re.compile(r"^[^\n\r\x00;`$]*\Z")
GEOMETRY = re.compile(r"^[0-9]{3,5}x[0-9]{3,5}\Z")
DISPLAY = re.compile(r"^[0-9]{1,3}\Z")
DISPLAY_RANGE = re.compile(r"^[1-9][0-9]{0,2}(-[1-9][0-9]{0,2})?\Z")
DEPTHS = ("16", "24", "32")
# the inputs that name a program or a directory, in the order their messages come
PATH_FIELDS = ("vnc_xvnc_executable", "vnc_websockify_executable", "vnc_vncpasswd_executable",
               "vnc_xauth_executable", "vnc_dbus_run_session_executable", "vnc_python", "vnc_novnc_dir")


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def geometry_ok(value: Any) -> bool:
    """WIDTHxHEIGHT, 320x200 to 8192x8192."""
    if not isinstance(value, str) or not GEOMETRY.match(value):
        return False
    width, height = (int(n) for n in value.split("x"))
    return 320 <= width <= 8192 and 200 <= height <= 8192


def app_command_ok(argv: Any) -> bool:
    """A non-empty argv list: a plain command name or path first, then words without newline, NUL, ;, $ or backtick."""
    return (_is_list(argv) and len(argv) > 0 and bool(PLAIN.match(str(argv[0])))
            and all(WORD.match(str(word)) for word in argv))


def input_errors(inputs: Mapping[str, Any], desktops: Mapping[str, Any]) -> List[str]:
    """The messages for the vnc role's refused ``inputs`` (its ``vnc_*`` variables, ``_vnc_app_command`` and
    ``_vnc_app_field``); ``desktops`` are the desktops it knows (``_vnc_desktop_commands``). [] when all are good."""
    errors = []
    if not geometry_ok(inputs.get("vnc_geometry")):
        errors.append("vnc_geometry must be WIDTHxHEIGHT in pixels (320x200 to 8192x8192), e.g. 1280x800")
    if str(inputs.get("vnc_depth")) not in DEPTHS:
        errors.append("vnc_depth must be 16, 24 or 32")
    if not DISPLAY.match(str(inputs.get("vnc_display"))):
        errors.append("vnc_display must be 0 (any free display) or a display number 1-999")
    if not DISPLAY_RANGE.match(str(inputs.get("vnc_display_range"))):
        errors.append("vnc_display_range must be START-END with display numbers 1-999")
    chosen = inputs.get("vnc_desktops")
    if not _is_list(chosen) or not chosen or any(not isinstance(d, str) or d not in desktops for d in chosen):
        errors.append("vnc_desktops must be a non-empty list of " + ", ".join(desktops))
    for field in PATH_FIELDS:
        value = inputs.get(field)
        if not is_plain(value):
            errors.append(field + " must be a plain path or command name")
    extra = inputs.get("vnc_xvnc_extra_args")
    if not _is_list(extra) or not all(WORD.match(str(word)) for word in extra):
        errors.append("vnc_xvnc_extra_args must be a list of words without newline, NUL, ;, $ or backtick")
    app, field = inputs.get("_vnc_app_command"), str(inputs.get("_vnc_app_field") or "")
    if (app or field) and not app_command_ok(app):
        errors.append(field + " must be a non-empty argv list: a plain command name or path first, then"
                      " arguments without newline, NUL, ;, $ or backtick")
    return errors


def _vnc_input_errors(inputs: Any, desktops: Any) -> List[str]:
    if not isinstance(inputs, Mapping) or not isinstance(desktops, Mapping):
        raise AnsibleFilterError("vnc_input_errors: the inputs and the desktops must be dictionaries")
    return input_errors(inputs, desktops)


class FilterModule:
    """hpc.interactive filters."""

    def filters(self):
        return {"vnc_input_errors": _vnc_input_errors}
