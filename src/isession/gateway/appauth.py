"""The gateway hands each app its per-session secret, so the user never sees or copies it.

How an app wants its secret is the ``auth`` entry of the service's spec (``session_service_spec.auth``, set by the
service role's ``main`` entry point; the gateway runs it once per service to read it), the same entry the tests use:

* ``type: header`` (the default; Jupyter, nginx): every backend request and WebSocket upgrade carries
  ``<header>: <format with {secret}>``; whatever the browser sent in that header is dropped.
* ``type: vnc`` (desktops): the gateway answers the VNC server's password challenge inside the RFB stream on the
  WebSocket (:mod:`.rfb`) and offers the browser no authentication, so noVNC connects without asking.
* ``type: form`` (code-server): the gateway posts ``<field>=<secret>`` to ``<base><path>`` once, keeps the
  session cookie the app answers with (in memory only; it is re-made after a restart or when it stops working)
  and adds it to the ``Cookie`` header of every backend request.

The secret is read from the session's 0600 ``secret`` file, never logged, never sent to the browser.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ansible_collections.hpc.interactive.plugins.module_utils import _state

SECRET_FILE = "secret"  # noqa: S105 - the file's name
RETRY_AFTER = 60.0


SPEC_PLAY = """- name: The service's auth entry
  hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - role: hpc.interactive.{service}
  tasks:
    - name: Write session_service_spec.auth
      ansible.builtin.copy:
        content: "{{{{ session_service_spec.auth | default({{}}) | to_json }}}}"
        dest: "{dest}"
        mode: "0600"
"""


def resolve_auth(col_root: Path, service: str, timeout: float = 120) -> Optional[Dict[str, Any]]:
    """The service's ``session_service_spec.auth`` as its role sets it (its ``main`` entry point has no side effects).

    Running the role is the one reading that follows the role wherever it takes its spec from (a shared role, a
    templated name, an included role): ~2 s, once per service and gateway. None when the play fails.
    """
    exe = Path(sys.executable).with_name("ansible-playbook")
    with tempfile.TemporaryDirectory(prefix="isession-gateway-") as tmp:
        play, out = Path(tmp) / "spec.yml", Path(tmp) / "auth.json"
        play.write_text(SPEC_PLAY.format(service=service, dest=out), encoding="utf-8")
        env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(col_root), "LC_ALL": "C.UTF-8",
               "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
               "ANSIBLE_PYTHON_INTERPRETER": sys.executable, "ANSIBLE_NOCOLOR": "1"}
        try:
            cp = subprocess.run([str(exe) if exe.exists() else "ansible-playbook", "-i", "localhost,", str(play)],
                                capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=tmp)
            data = json.loads(out.read_text(encoding="utf-8")) if cp.returncode == 0 else None
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
    return data if isinstance(data, dict) else None


def read_session_secret(session_dir: Path) -> Optional[str]:
    try:
        text = _state.read_text(str(session_dir / SECRET_FILE))
    except (OSError, ValueError):
        return None
    return text.strip() if text else None


class AppAuth:
    """Adds the app's secret to backend requests, per session."""

    def __init__(self, col_root: Optional[Path], specs: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
        self.col_root = col_root
        self.specs: Dict[str, Dict[str, Any]] = dict(specs or {})
        self._form_cookies: Dict[Tuple[str, str], str] = {}  # (session dir, secret) -> "name=value"
        self._locks: Dict[str, asyncio.Lock] = {}
        self._failed: Dict[str, float] = {}  # service -> when to try again

    def known(self, service: Optional[str]) -> bool:
        """Resolved, or failed and not yet due for another try."""
        return (service or "") in self.specs or time.monotonic() < self._failed.get(service or "", 0.0)

    def load(self, service: str) -> Dict[str, Any]:
        """Resolve (once) and return the service's auth entry; {} while the role cannot tell (tried again after
        ``RETRY_AFTER`` seconds: a play that failed on a loaded machine must not leave the app without its secret)."""
        if service not in self.specs and time.monotonic() >= self._failed.get(service, 0.0):
            found = resolve_auth(self.col_root, service) if self.col_root else None
            if found is None:
                self._failed[service] = time.monotonic() + RETRY_AFTER
                return {}
            self.specs[service] = found
        return self.specs.get(service, {})

    async def ensure(self, service: Optional[str]) -> None:
        """:meth:`load` off the event loop, one resolution per service however many requests wait for it."""
        if not service or service in self.specs or time.monotonic() < self._failed.get(service, 0.0):
            return
        async with self._locks.setdefault("spec:" + service, asyncio.Lock()):
            if service not in self.specs:
                await asyncio.to_thread(self.load, service)

    def spec(self, service: Optional[str]) -> Dict[str, Any]:
        return self.specs.get(service or "", {})

    def header(self, service: Optional[str], secret: str) -> Optional[Tuple[str, str]]:
        spec = self.spec(service)
        if spec.get("type", "header") != "header" or not spec.get("header"):
            return None
        return str(spec["header"]), str(spec.get("format", "{secret}")).replace("{secret}", secret)

    def vnc_password(self, service: Optional[str], secret: str) -> Optional[str]:
        """For a ``type: vnc`` app: the VNC password the gateway answers the server's challenge with.

        ``password: derived`` (the desktop roles): derived from the session secret by the collection's own
        ``_desktop.vnc_password``; otherwise the secret's first 8 characters (VNC reads no more).
        """
        spec = self.spec(service)
        if spec.get("type") != "vnc":
            return None
        if spec.get("password") == "derived":
            return _desktop_module().vnc_password(secret)
        return secret[:8]

    def check_answer(self, sess_dir: Path, service: Optional[str], status: int, location: str) -> None:
        """A ``type: form`` app that answers 401 or sends the browser to its login page no longer takes the
        gateway's cookie (the app restarted, the cookie expired): forget it, so the next request logs in again."""
        if self.spec(service).get("type") != "form":
            return
        path = str(self.spec(service).get("path", "login"))
        if status == 401 or (300 <= status < 400 and location.split("?", 1)[0].endswith("/" + path)):
            self._form_cookies = {k: v for k, v in self._form_cookies.items() if k[0] != str(sess_dir)}

    def is_form(self, service: Optional[str]) -> bool:
        return self.spec(service).get("type") == "form"

    def drop_headers(self, service: Optional[str]) -> Tuple[str, ...]:
        """Headers of the browser's request that must not reach the app (the secret's own)."""
        spec = self.spec(service)
        return tuple(str(spec[k]).lower() for k in ("header", "alternative_header") if spec.get(k))

    async def form_cookie(self, session, sess_dir: Path, base_url: str, *, service: Optional[str], secret: str,
                          ssl: Any, renew: bool = False) -> Optional[str]:
        """``name=value`` of the app's login cookie for a ``type: form`` app (logging in when needed)."""
        spec = self.spec(service)
        if spec.get("type") != "form":
            return None
        key = (str(sess_dir), secret)
        if not renew and key in self._form_cookies:
            return self._form_cookies[key]
        lock = self._locks.setdefault(str(sess_dir), asyncio.Lock())
        async with lock:
            if not renew and key in self._form_cookies:
                return self._form_cookies[key]
            url = base_url + str(spec.get("path", "login"))
            data = {str(spec.get("field", "password")): secret}
            async with session.post(url, data=data, allow_redirects=False, ssl=ssl) as resp:
                jar: SimpleCookie = SimpleCookie()
                for value in resp.headers.getall("Set-Cookie", []):
                    jar.load(value)
                if not jar or resp.status >= 400:
                    return None
                cookie = "; ".join(f"{m.key}={m.value}" for m in jar.values())
            self._form_cookies = {k: v for k, v in self._form_cookies.items() if k[0] != str(sess_dir)}
            self._form_cookies[key] = cookie
            return cookie


def _desktop_module():
    """The desktop roles' helpers (VNC password derivation), imported when a desktop session needs them."""
    from ansible_collections.hpc.interactive.plugins.module_utils import _desktop  # noqa: PLC0415

    return _desktop
