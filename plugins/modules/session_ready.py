#!/usr/bin/python
# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: session_ready
short_description: Wait until a session's app answers through the path the user will use
version_added: 0.1.0
description:
  - Polls C(http://HOST:PORT<URL>/<PORT>/<probe>) (C(https) when O(url=/sme); the certificate is not checked,
    the connection is to the loopback end of the session's tunnel) every O(interval) seconds.
  - Ready means an HTTP answer with status 2xx, 3xx, 401 or 403 (the app is up and guards itself). A 5xx (for
    example a proxy's 502) or no connection is not ready. Redirects are not followed.
  - When O(host) is a loopback address, ready also means that every listening socket a connection to the port
    reaches belongs to the user running this module (the kernel's uid column of C(/proc/net/tcp)), checked before
    and after each answer. On a shared host another user can bind a session's port while it is free for a moment
    (before the session's tunnel or server comes up); such a listener ends the wait at once with a message naming
    that user, and the session is never marked running, so that no request carrying its secret goes there.
  - Between polls it reads the session directory (O(dir)) when given - a terminal step in C(state.json) (written by
    a cancel or the watcher) or a C(cancel_requested) tombstone ends the wait at once, as does an C(agent.error)
    file written by the agent - and, when O(agent_pid) is given, it ends the wait when that process is gone.
  - Gives up after O(timeout) seconds with C(no answer from the server after N s).
  - No secret is needed or sent; a 401/403 from the app counts as ready.
  - With O(pin_certificate) (O(url=/sme) only) the certificate the backend presented in the answer that made it
    ready is saved there (PEM, mode 0600, replaced atomically) before the session is marked running. That answer
    came through a loopback listener checked to be the user's own, i.e. the session's tunnel to the server its
    agent started, so this is the certificate the agent made; a gateway then accepts that certificate and no other.
  - With O(mark_running=true) the module records the session as running the moment the app answers - step
    C(running) in C(state.json) (refused when a cancel was requested meanwhile) and C(JOB_STATUS Running) in
    C(service.json) - so no further task stands between the port answering and C(Running).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: probes once and does not wait; writes nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  port:
    description: The workspace-side port C(PORT) (the tunnel's end or, for the workspace target, the server's port).
    type: int
    required: true
  url:
    description: C(URL) of the session; V(/sme) probes with https.
    type: str
    choices: [/me, /sme]
    default: /me
  probe:
    description: Path under the base path C(<URL>/<PORT>/) that answers when the app is ready (no leading C(/)).
    type: str
    default: ""
  host:
    description:
      - Address to connect to. For V(127.0.0.1), V(localhost) and V(::1) the owner of the listening socket is
        checked too (see above); for any other address it cannot be.
    type: str
    default: 127.0.0.1
  timeout:
    description: Seconds to wait in all (the role's C(session_start_timeout)).
    type: float
    default: 300
  interval:
    description: Seconds between polls.
    type: float
    default: 0.2
  request_timeout:
    description: Seconds one HTTP request may take.
    type: float
    default: 2
  dir:
    description: The session directory on the workspace (for C(state.json) and C(agent.error)).
    type: path
  pin_certificate:
    description:
      - Where to save the certificate the https backend presented when it became ready (see above). Needs
        O(url=/sme).
    type: path
  agent_pid:
    description: Pid of the local agent (workspace target); the wait ends when it exits.
    type: int
  mark_running:
    description:
      - When the app answers, set step C(running) in C(<dir>/state.json) and C(JOB_STATUS) V(Running) in
        C(<dir>/service.json). Needs O(dir).
    type: bool
    default: false
author:
  - hpc.interactive developers (@hpc-interactive)
"""

EXAMPLES = r"""
- name: Wait for the app
  hpc.interactive.session_ready:
    port: "{{ _wsport.port }}"
    url: /me
    probe: api/status
    timeout: 300
    dir: "{{ _session.dir }}"
  register: _ready
"""

RETURN = r"""
ready:
  description: Whether the app answered (always V(true) unless in check mode; the module fails otherwise).
  returned: always
  type: bool
  sample: true
status:
  description: The last HTTP status seen (V(null) when no connection succeeded).
  returned: always
  type: int
  sample: 200
elapsed:
  description: Seconds spent waiting.
  returned: always
  type: float
  sample: 0.42
marked_running:
  description: Whether C(state.json) and C(service.json) were set to running by this call.
  returned: always
  type: bool
  sample: true
port_owner:
  description:
    - Who listened on the port at the last check (O(host) loopback only) - C(state) V(own), V(foreign) (another
      user's listener), V(none) or V(unknown), the listeners' C(uids), and a C(message) in words.
  returned: when O(host) is a loopback address
  type: dict
  sample: {state: own, uids: [1001], message: ""}
certificate_sha256:
  description: The SHA-256 fingerprint (hex) of the certificate saved to O(pin_certificate).
  returned: when O(pin_certificate) is given and the app answered
  type: str
  sample: 3f0c...e1
probe_url:
  description: The URL probed.
  returned: always
  type: str
  sample: http://127.0.0.1:23456/me/23456/api/status
"""

import hashlib
import http.client
import os
import ssl
from typing import Optional, Tuple
from urllib.parse import urlsplit

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hpc.interactive.plugins.module_utils._listeners import PortOwner, check_port_owner
from ansible_collections.hpc.interactive.plugins.module_utils._proc import alive as process_alive
from ansible_collections.hpc.interactive.plugins.module_utils._readiness import (
    ReadinessError,
    agent_error,
    probe_url,
    ready_status,
    wait_ready,
)
from ansible_collections.hpc.interactive.plugins.module_utils._service_file import (
    ServiceFileError,
    update_service_file,
    write_atomic,
)
from ansible_collections.hpc.interactive.plugins.module_utils._state import (
    STATE_FILE,
    TERMINAL_STEPS,
    StateError,
    read_record,
    run_op,
)


def fetch_status(url: str, timeout: float) -> Tuple[Optional[int], str]:
    """One GET without following redirects -> (status, "") or (None, error text)."""
    status, error, _cert = fetch_answer(url, timeout)
    return status, error


def fetch_answer(url: str, timeout: float) -> Tuple[Optional[int], str, Optional[bytes]]:
    """One GET without following redirects -> (status, "", the https peer's DER certificate or None) or
    (None, error text, None)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # loopback end of the session's own tunnel; self-signed app certs
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""),
                     headers={"User-Agent": "hpc.interactive session_ready"})
        sock = conn.sock  # before the answer: a server that closes after it leaves conn.sock None
        cert = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        return conn.getresponse().status, "", cert
    except (OSError, http.client.HTTPException) as exc:
        return None, str(exc) or exc.__class__.__name__, None
    finally:
        conn.close()


# the loopback addresses whose listeners this host's /proc/net/tcp shows, as _listeners names them
LOOPBACK = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1"}


def taken_over_message(owner: PortOwner) -> str:
    """Why a session is not started when another user listens on its port."""
    return ("%s: the session is not marked running, so that its requests and its secret cannot reach that user"
            % owner.message)


class SessionReady:
    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.owner = None  # type: Optional[PortOwner]
        self.cert = None  # type: Optional[bytes]

    def owner_ok(self, address: Optional[str]) -> Tuple[bool, str]:
        """Whether the port's listeners are this user's (always when the address is not loopback); why not."""
        if address is None:
            return True, ""
        self.owner = check_port_owner(self.params["port"], os.geteuid(), address)
        return self.owner.ok, self.owner.message

    def abort_reason(self) -> Optional[str]:
        """A reason to stop waiting now, or None."""
        directory, pid = self.params["dir"], self.params["agent_pid"]
        if self.owner is not None and self.owner.state == "foreign":
            return taken_over_message(self.owner)
        if directory:
            try:
                record = read_record(os.path.join(directory, STATE_FILE))
            except StateError:
                record = None
            if record and record.get("step") in TERMINAL_STEPS:
                return record.get("error") or "the session was %s while waiting for the server" % record["step"]
            if record and record.get("cancel_requested"):
                return "the session was cancelled while waiting for the server"
            why = agent_error(directory)
            if why:
                return why
        if pid and not process_alive(pid):
            why = agent_error(directory)
            return why or "the agent (pid %d) exited before the server answered; see its logs" % pid
        return None

    def run(self) -> None:
        p = self.params
        try:
            url = probe_url(p["port"], p["url"], p["probe"], p["host"])
        except ReadinessError as exc:
            self.module.fail_json(msg=exc.msg, field=exc.field)
        if p["pin_certificate"] and p["url"] != "/sme":
            self.module.fail_json(msg="pin_certificate needs url /sme (an https backend)", field="pin_certificate")
        if p["timeout"] <= 0 or p["interval"] <= 0 or p["request_timeout"] <= 0:
            self.module.fail_json(msg="timeout, interval and request_timeout must be positive", field="timeout")
        timeout = 0.0 if self.module.check_mode else p["timeout"]

        address = LOOPBACK.get(p["host"])

        def fetch() -> Tuple[Optional[int], str]:
            # whose listener answers, before (no request to another user's) and after (still ours) the answer
            ok, why = self.owner_ok(address)
            if not ok:
                return None, why
            status, error, self.cert = fetch_answer(url, p["request_timeout"])
            if ready_status(status):
                ok, why = self.owner_ok(address)
                if not ok:
                    return None, why
            return status, error

        ready, status, elapsed, why = wait_ready(fetch, timeout, interval=p["interval"], abort=self.abort_reason)
        result = {"changed": False, "ready": ready, "status": status, "elapsed": round(elapsed, 3),
                  "probe_url": url, "marked_running": False}
        if self.owner is not None:
            result["port_owner"] = {"state": self.owner.state, "uids": list(self.owner.uids),
                                    "message": self.owner.message}
        if ready and p["pin_certificate"] and not self.module.check_mode:
            self.pin(result)
        if ready and p["mark_running"] and not self.module.check_mode:
            self.mark_running(result)
        if not ready and not self.module.check_mode:
            self.module.fail_json(msg=why, **result)
        self.module.exit_json(**result)

    def pin(self, result: dict) -> None:
        """Save the certificate of the answer that made the session ready (PEM, 0600, atomically)."""
        path = self.params["pin_certificate"]
        if not self.cert:
            self.module.fail_json(msg="the https backend presented no certificate to pin", field="pin_certificate",
                                  **result)
        pem = ssl.DER_cert_to_PEM_cert(self.cert)
        try:
            with open(path, encoding="ascii") as old:
                same = old.read() == pem
        except (OSError, ValueError):
            same = False
        if not same:
            try:
                write_atomic(path, pem, 0o600)
            except (OSError, ServiceFileError) as exc:
                self.module.fail_json(msg="cannot save the pinned certificate to %s: %s" % (path, exc),
                                      field="pin_certificate", **result)
        result.update(changed=result["changed"] or not same, certificate_sha256=hashlib.sha256(self.cert).hexdigest())

    def mark_running(self, result: dict) -> None:
        """step running in state.json (refused after a cancel request), then JOB_STATUS Running in service.json."""
        directory = self.params["dir"]
        root, session_id = os.path.split(os.path.normpath(directory))
        try:
            plan = run_op("update", root, session_id, {"step": "running"})
            changed, _content = update_service_file(os.path.join(directory, "service.json"), job_status="Running")
        except (StateError, ServiceFileError) as exc:
            self.module.fail_json(msg=exc.msg, field="dir", **result)
        except OSError as exc:
            self.module.fail_json(msg="cannot record the running session in %s: %s" % (directory, exc), field="dir",
                                  **result)
        result.update(changed=result["changed"] or plan.changed or changed, marked_running=True)


ARGUMENT_SPEC = dict(
    port=dict(type="int", required=True),
    url=dict(type="str", choices=["/me", "/sme"], default="/me"),
    probe=dict(type="str", default=""),
    host=dict(type="str", default="127.0.0.1"),
    timeout=dict(type="float", default=300),
    interval=dict(type="float", default=0.2),
    request_timeout=dict(type="float", default=2),
    dir=dict(type="path"),
    agent_pid=dict(type="int"),
    mark_running=dict(type="bool", default=False),
    pin_certificate=dict(type="path"),
)

MODULE_OPTIONS = dict(required_if=[("mark_running", True, ("dir",))], supports_check_mode=True)


def run_module(module: AnsibleModule) -> None:
    """The module's work; also run inside the Ansible worker by the action plugin of the same name."""
    SessionReady(module).run()


def main() -> None:
    run_module(AnsibleModule(argument_spec=ARGUMENT_SPEC, **MODULE_OPTIONS))


if __name__ == "__main__":
    main()
