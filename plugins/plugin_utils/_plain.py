# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A plain path or command name, the one rule the roles' and plugins' input checks share.

Used by the test ``hpc.interactive.plain_command`` (what the rstudio, matlab and nicedcv spec tasks ask) and the
filter ``hpc.interactive.vnc_input_errors`` (the vnc, desktop_app and matlab desktop inputs).
"""
from __future__ import annotations

import re
from typing import Any

# a plain path or command name: never an option, never a word of shell
PLAIN = re.compile(r"^[A-Za-z0-9_.+/][A-Za-z0-9_.+/-]*\Z")


def is_plain(value: Any) -> bool:
    """A string of letters, digits and ``_.+/-``, not starting with ``-``: no space, quote, shell character, ``~``."""
    return isinstance(value, str) and PLAIN.match(value) is not None
