"""The gateway hands each app its per-session secret, so the user never sees or copies it.

How an app wants its secret is the ``auth`` entry of the service's spec (``roles/<service>/tasks/spec.yml``,
``session_service_spec.auth``), the same entry the tests use:

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
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from .. import mu

SECRET_FILE = "secret"  # noqa: S105 - the file's name


def load_auth_specs(col_path: Path) -> Dict[str, Dict[str, Any]]:
    """``{service: auth}`` from every role's ``tasks/spec.yml`` (their Jinja is in values the gateway ignores)."""
    specs: Dict[str, Dict[str, Any]] = {}
    for path in sorted((col_path / "roles").glob("*/tasks/spec.yml")):
        try:
            tasks = yaml.safe_load(path.read_text(encoding="utf-8")) or []
        except (OSError, yaml.YAMLError):
            continue
        for task in tasks if isinstance(tasks, list) else []:
            spec = ((task or {}).get("ansible.builtin.set_fact") or {}).get("session_service_spec") or {}
            if isinstance(spec, dict) and spec.get("name") and isinstance(spec.get("auth"), dict):
                specs[str(spec["name"])] = dict(spec["auth"])
    return specs


def read_session_secret(session_dir: Path) -> Optional[str]:
    try:
        text = mu.load("_state").read_text(str(session_dir / SECRET_FILE))
    except (OSError, ValueError):
        return None
    return text.strip() if text else None


class AppAuth:
    """Adds the app's secret to backend requests, per session."""

    def __init__(self, specs: Dict[str, Dict[str, Any]]) -> None:
        self.specs = specs
        self._form_cookies: Dict[Tuple[str, str], str] = {}  # (session dir, secret) -> "name=value"
        self._locks: Dict[str, asyncio.Lock] = {}

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
            return mu.load("_desktop").vnc_password(secret)
        return secret[:8]

    def check_answer(self, sess_dir: Path, service: Optional[str], status: int, location: str) -> None:
        """A ``type: form`` app that answers 401 or sends the browser to its login page no longer takes the
        gateway's cookie (the app restarted, the cookie expired): forget it, so the next request logs in again."""
        if self.spec(service).get("type") != "form":
            return
        path = str(self.spec(service).get("path", "login"))
        if status == 401 or (300 <= status < 400 and location.split("?", 1)[0].endswith("/" + path)):
            self._form_cookies = {k: v for k, v in self._form_cookies.items() if k[0] != str(sess_dir)}

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
