"""``python -m isession``: the same as the ``isession`` console script."""
from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
