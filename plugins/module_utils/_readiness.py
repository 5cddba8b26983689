# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Readiness: when a session's app counts as up, and the one wait for it.

Private to the hpc.interactive collection; standard library only. ``session_ready`` runs the wait on the workspace
(architecture step 4) against ``http(s)://127.0.0.1:PORT<URL>/<PORT>/<probe>``; the record it then marks running is
``_state``'s, the processes it watches meanwhile are read through ``_proc``.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional, Tuple

from ansible_collections.hpc.interactive.plugins.module_utils._state import MAX_TEXT, URLS


class ReadinessError(ValueError):
    """A refused readiness input; ``field`` names the option at fault."""

    def __init__(self, msg: str, field: Optional[str] = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.field = field


def ready_status(status: Optional[int]) -> bool:
    """An HTTP answer that means the app is up: 2xx, 3xx, 401, 403 (a 5xx proxy error is not)."""
    return status is not None and (200 <= status < 400 or status in (401, 403))


def probe_url(port: int, url: str, probe: str = "", host: str = "127.0.0.1") -> str:
    """``http(s)://HOST:PORT<URL>/<PORT>/<probe>``; ``/sme`` means an https backend."""
    if url not in URLS:
        raise ReadinessError("url must be one of %s, got %r" % (", ".join(URLS), url), "url")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ReadinessError("port must be 1..65535, got %r" % (port,), "port")
    if probe.startswith("/") or any(c.isspace() for c in probe) or ".." in probe.split("/"):
        raise ReadinessError("probe must be a relative path under the base path, got %r" % (probe,), "probe")
    scheme = "https" if url == "/sme" else "http"
    return "%s://%s:%d%s/%d/%s" % (scheme, host, port, url, port, probe)


def agent_error(directory: Optional[str]) -> Optional[str]:
    """The first line of ``agent.error`` in the session dir, if the agent wrote one."""
    if not directory:
        return None
    try:
        with open(os.path.join(directory, "agent.error"), encoding="utf-8", errors="replace") as handle:
            text = handle.read(MAX_TEXT).strip()
    except OSError:
        return None
    return text.splitlines()[0] if text else "the agent failed without a message"


def wait_ready(fetch: Callable[[], Tuple[Optional[int], str]], timeout: float, *, interval: float = 0.2,
               abort: Optional[Callable[[], Optional[str]]] = None, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> Tuple[bool, Optional[int], float, str]:
    """Poll ``fetch`` (-> HTTP status or None, error text) until ready, aborted or ``timeout``.

    ``abort`` is asked between polls and returns a message to stop at once (a terminal step, a dead
    agent, ``agent.error``). Returns ``(ready, last status, elapsed seconds, message)``.
    """
    start = clock()
    status, last_error = None, ""  # type: Optional[int], str
    while True:
        status, last_error = fetch()
        elapsed = clock() - start
        if ready_status(status):
            return True, status, elapsed, ""
        why = abort() if abort else None
        if why:
            return False, status, elapsed, why
        if elapsed >= timeout:
            seen = ("last answer HTTP %d" % status) if status is not None else (last_error or "no connection")
            return False, status, elapsed, "no answer from the server after %d s (%s)" % (round(timeout), seen)
        sleep(max(0.0, min(interval, timeout - elapsed)))
