"""Who is logged in: users, login secrets, login cookies, CSRF tokens, safe redirect targets.

Single-user mode (the default): the user running the gateway, whose login secret is a 0600 file
(``~/.config/isession/gateway.secret``, made on first start). Multi-user mode: a users file maps each login name to
its own session root and secret file; or, when a trusted front proxy is configured, the proxy's header names the
user and there is no login form at all.

A login is a random token in an HttpOnly, SameSite=Strict cookie. The gateway keeps only the token's SHA-256, in
one 0600 file per login under its state directory (so a restarted gateway keeps everyone logged in, and logout -
removing the file - invalidates the cookie for good). A cookie whose file is gone, whose expiry passed, or that was
never issued is refused.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import pwd
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import yaml

COOKIE = "isession_gateway"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{40,64}\Z")
# the login cookie's value in a Cookie header (any value: lookup() judges it); the last one wins, as in aiohttp's
# own request.cookies, which this replaces on the proxy's path (it parses every cookie of the app's, each request)
_COOKIE_RE = re.compile(r"(?:^|;)[ \t]*" + COOKIE + r"=([^;]*)")
USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\Z")
# a local path to go to after login: one leading slash, no scheme, no "//" or "/\" (another host), printable
_NEXT_RE = re.compile(r"/(?![/\\])[\x21-\x7e]*\Z")


class AuthError(ValueError):
    """A configuration the gateway refuses to start with; the message names the file or option."""


@dataclass(frozen=True)
class User:
    """One login name and where its sessions live. ``uid``/``gid`` own the session root."""

    name: str
    root: Path
    uid: int
    gid: int
    secret_file: Optional[Path]
    state: Path  # the gateway's own files for this user (activity, pending starts)


def safe_next(value: Optional[str], default: str = "/") -> str:
    """``value`` when it is a path on this gateway, else ``default`` (no open redirect after login)."""
    if value and _NEXT_RE.match(value) and "\\" not in value:
        return value
    return default


def read_secret(path: Path) -> str:
    """The login secret in ``path``; refused when the file is not a 0600 (or stricter) regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise AuthError(f"login secret {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise AuthError(f"login secret {path} is not a regular file")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise AuthError(f"login secret {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                        "chmod 600 it")
    value = path.read_text(encoding="utf-8").strip()
    if len(value) < 16:
        raise AuthError(f"login secret {path} is shorter than 16 characters")
    return value


def ensure_secret(path: Path) -> bool:
    """Create the 0600 login secret file if it is missing (exclusive create); True when it was made."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, (secrets.token_urlsafe(24) + "\n").encode("ascii"))
    finally:
        os.close(fd)
    return True


def _owner(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_uid, st.st_gid


def load_users_file(path: Path, state_dir: Path) -> Dict[str, User]:
    """Multi-user mode's users file::

        users:
          alice: {root: /home/alice/.local/state/isession/sessions, secret_file: /etc/isession/gateway/alice}
          bob:   {root: /home/bob/.local/state/isession/sessions}    # header login only

    Each root must exist; its owner is the uid the user's sessions run as.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise AuthError(f"--users: cannot read {path}: {exc}") from None
    entries = data.get("users") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise AuthError(f"--users: {path} must hold a mapping 'users' of login names")
    users = {}
    for name, entry in entries.items():
        if not isinstance(name, str) or not USER_RE.match(name):
            raise AuthError(f"--users: {name!r} in {path} is not a user name")
        if not isinstance(entry, dict) or not isinstance(entry.get("root"), str):
            raise AuthError(f"--users: users.{name}.root is missing in {path}")
        root = Path(entry["root"]).expanduser()
        if not root.is_absolute() or not root.is_dir():
            raise AuthError(f"--users: users.{name}.root {root} is not an existing absolute directory")
        secret = entry.get("secret_file")
        uid, gid = _owner(root)
        users[name] = User(name, root, uid, gid, Path(secret) if secret else None, state_dir / "users" / name)
    return users


def single_user(root: Path, secret_file: Path, state_dir: Optional[Path]) -> User:
    name = pwd.getpwuid(os.getuid()).pw_name
    return User(name, root, os.getuid(), os.getgid(), secret_file, state_dir or root / ".gateway")


def cookie_token(header: Optional[str]) -> Optional[str]:
    """The login cookie's value in the ``Cookie`` header ``header``, or None."""
    if not header:
        return None
    found = _COOKIE_RE.findall(header)
    return found[-1].strip() if found else None


def check_password(user: User, given: str) -> bool:
    """Compare ``given`` with the user's secret file in constant time; a user without a file cannot log in."""
    if user.secret_file is None or not given:
        return False
    try:
        expected = read_secret(user.secret_file)
    except (AuthError, OSError):
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.strip().encode("utf-8"))


@dataclass
class Login:
    user: str
    expires: float
    csrf: str


class Logins:
    """Login tokens: issued, looked up, revoked; one 0600 file per login named by the token's SHA-256."""

    def __init__(self, directory: Path, ttl: float) -> None:
        self.dir = directory
        self._prefix = str(directory) + os.sep
        self.ttl = ttl
        self._cache: Dict[str, Login] = {}
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode("ascii")).hexdigest()

    def issue(self, user: str, now: Optional[float] = None) -> str:
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        login = Login(user, now + self.ttl, secrets.token_urlsafe(24))
        key = self._key(token)
        fd = os.open(self.dir / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"user": login.user, "expires": login.expires, "csrf": login.csrf}, fh)
        self._cache[key] = login
        return token

    def lookup(self, token: Optional[str], now: Optional[float] = None) -> Optional[Login]:
        """The live login of ``token``; None for a missing, malformed, unknown, revoked or expired one."""
        if not token or not TOKEN_RE.match(token):
            return None
        now = time.time() if now is None else now
        key = self._key(token)
        login = self._cache.get(key)
        path = self._prefix + key
        if login is None:
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
                login = Login(str(data["user"]), float(data["expires"]), str(data["csrf"]))
            except (OSError, ValueError, KeyError, TypeError):
                return None
            self._cache[key] = login
        elif not os.path.exists(path):  # revoked by another gateway process or by hand: seen at the next request
            self._cache.pop(key, None)
            return None
        if login.expires <= now:
            self.revoke(token)
            return None
        return login

    def revoke(self, token: Optional[str]) -> None:
        if not token or not TOKEN_RE.match(token):
            return
        key = self._key(token)
        self._cache.pop(key, None)
        try:
            (self.dir / key).unlink()
        except FileNotFoundError:
            pass

    def sweep(self, now: Optional[float] = None) -> int:
        """Remove expired login files; returns how many."""
        now = time.time() if now is None else now
        gone = 0
        for path in self.dir.iterdir():
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("expires", 0) <= now:
                    path.unlink()
                    self._cache.pop(path.name, None)
                    gone += 1
            except (OSError, ValueError, AttributeError):
                continue
        return gone


def csrf_ok(login: Login, given: Optional[str]) -> bool:
    return bool(given) and hmac.compare_digest(login.csrf.encode(), str(given).encode())
