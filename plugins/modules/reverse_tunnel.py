#!/usr/bin/python
# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: reverse_tunnel
short_description: Keep a supervised C(ssh -N -R) reverse tunnel from this host to a destination
version_added: 0.1.0
description:
  - Keeps C(ssh -N -R 127.0.0.1:RPORT:LOCAL_HOST:LOCAL_PORT) running from the host the module runs on to
    O(dest_host), so that C(127.0.0.1:RPORT) on the destination reaches O(local_host):O(local_port) here.
  - ssh runs with C(ExitOnForwardFailure=yes), C(BatchMode=yes), C(ServerAliveInterval), C(ServerAliveCountMax)
    and C(ConnectTimeout) under a small supervisor (detached with C(setsid), stdin from C(/dev/null), output to a
    log in O(state_dir)) that restarts ssh when it dies, with a capped exponential backoff, and gives up after
    O(restart_max_failures) consecutive failures within O(restart_window) seconds, recording why.
  - The supervisor is the collection's C(_tunnel.py) module_utils file, copied to O(state_dir) and run with
    O(python); batch jobs run the very same file. No systemd is needed.
  - Files in O(state_dir) (mode 0700; files 0600) are C(NAME.pid), C(NAME.status.json) (pid, ssh_pid, started,
    restarts, last_error, state), C(NAME.spec.json), C(NAME.log) and C(NAME.lock).
  - O(state=present) on a healthy tunnel with the same parameters is C(changed=false); with other parameters the
    tunnel is restarted. It waits until ssh reports the forward established and fails with ssh's message
    (for example C(remote port forwarding failed for listen port N)) if it does not come up in O(timeout)
    seconds; then nothing is left running.
  - O(state=absent) sends C(TERM) to the supervisor's process group, C(KILL) after O(stop_timeout) seconds, and
    removes the pid file. Running it again is C(changed=false).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The diff shows the tunnel parameters (the spec file) before and after.
  platform:
    platforms: posix
options:
  name:
    description: Tunnel id; 1-64 letters, digits, C(_), C(.), C(-), starting with a letter or digit.
    type: str
    required: true
  state:
    description: V(present) keeps the tunnel up, V(absent) stops it.
    type: str
    choices: [present, absent]
    default: present
  state_dir:
    description: Directory for the pid, status, spec and log files; created with mode 0700.
    type: path
    required: true
  remote_port:
    description: Port bound to C(127.0.0.1) on the destination; V(0) lets sshd pick one (returned as RV(port)).
    type: int
  local_host:
    description: Host the forwarded connections go to, as seen from this host.
    type: str
    default: 127.0.0.1
  local_port:
    description: Port the forwarded connections go to.
    type: int
  dest_host:
    description: SSH server that listens on O(remote_port).
    type: str
  dest_user:
    description: User on O(dest_host); default from the SSH configuration.
    type: str
  dest_port:
    description: SSH port of O(dest_host).
    type: int
    default: 22
  jump_host:
    description:
      - Optional jump host, V(host), V(user@host) or V(user@host:port) (IPv6 as V([addr])).
      - Reached with the same ssh options (identity, known hosts, keepalives) through a C(ProxyCommand).
    type: str
  jump_user:
    description: User on the jump host when not in O(jump_host).
    type: str
  jump_port:
    description: SSH port of the jump host when not in O(jump_host) (default 22).
    type: int
  identity_file:
    description: Private key file (C(IdentitiesOnly=yes)). Keys are files; no secret is ever put in argv.
    type: path
  known_hosts_policy:
    description: V(strict) needs a known host key; V(accept-new) adds unknown keys; V(no) skips the check.
    type: str
    choices: [strict, accept-new, 'no']
    default: strict
  known_hosts_file:
    description: Known hosts file to use (with V(no) and no file, C(/dev/null) is used).
    type: path
  server_alive_interval:
    description: C(ServerAliveInterval) in seconds.
    type: int
    default: 15
  server_alive_count_max:
    description: C(ServerAliveCountMax).
    type: int
    default: 3
  connect_timeout:
    description: C(ConnectTimeout) in seconds.
    type: int
    default: 10
  timeout:
    description: Seconds to wait for the tunnel to come up.
    type: float
    default: 30
  stop_timeout:
    description: Seconds between C(TERM) and C(KILL) when stopping.
    type: float
    default: 5
  restart_max_failures:
    description: The supervisor gives up after this many consecutive failed ssh runs within O(restart_window).
    type: int
    default: 8
  restart_window:
    description: Seconds of the window for O(restart_max_failures).
    type: int
    default: 300
  restart_backoff_max:
    description: Longest wait in seconds between two ssh runs (the wait doubles from 1 s).
    type: int
    default: 30
  local_owner_timeout:
    description:
      - Before a tunnel is started, wait up to this many seconds until a listening socket of the user running the
        module holds O(local_port) on O(local_host) (a loopback address), judged by the kernel's uid column of
        C(/proc/net/tcp). Another user's listener there fails the task at once, and so does no listener in time -
        the tunnel would hand the destination's requests, with the session's secret, to whoever listens.
      - V(0) (the default) starts the tunnel without looking.
    type: float
    default: 0
  local_owner_pid:
    description: With O(local_owner_timeout), stop waiting as soon as this process (the server or its agent) is gone.
    type: int
  python:
    description: Interpreter that runs the supervisor (with C(-I), isolated); default the one running this module.
    type: path
  ssh_executable:
    description: The ssh client; default C(ssh) from the PATH.
    type: path
notes:
  - The remote listener is always bound to C(127.0.0.1) on the destination.
author:
  - hpc.interactive developers (@hpc-interactive)
"""

EXAMPLES = r"""
- name: Reach the app on this compute node from the workspace at 127.0.0.1:56321
  hpc.interactive.reverse_tunnel:
    name: s1
    state_dir: "{{ remote_root }}/s1"
    remote_port: 56321
    local_port: "{{ node_port }}"
    dest_host: workspace.example.org
    dest_user: "{{ workspace_user }}"

- name: The same through the login node
  hpc.interactive.reverse_tunnel:
    name: s1
    state_dir: "{{ remote_root }}/s1"
    remote_port: 56321
    local_port: "{{ node_port }}"
    dest_host: workspace.example.org
    jump_host: "{{ ansible_user }}@login1:22"
    known_hosts_policy: accept-new

- name: Stop it
  hpc.interactive.reverse_tunnel:
    name: s1
    state_dir: "{{ remote_root }}/s1"
    state: absent
"""

RETURN = r"""
tunnel_state:
  description: V(up) after O(state=present), V(stopped) after O(state=absent) (predicted in check mode).
  returned: always
  type: str
  sample: up
port:
  description: The port listening on the destination (the one sshd allocated when O(remote_port=0)).
  returned: when O(state=present)
  type: int
  sample: 56321
pid:
  description: Supervisor pid.
  returned: when O(state=present) and not in check mode
  type: int
  sample: 41235
ssh_pid:
  description: Pid of the running ssh.
  returned: when O(state=present) and not in check mode
  type: int
  sample: 41236
restarts:
  description: How often the supervisor restarted ssh.
  returned: when O(state=present)
  type: int
  sample: 0
ssh_argv:
  description: The ssh command line (never holds secrets).
  returned: when O(state=present)
  type: list
  elements: str
  sample: [/usr/bin/ssh, -N, -T, -v, -o, ExitOnForwardFailure=yes, -R, "127.0.0.1:56321:127.0.0.1:8888",
           -p, "22", --, workspace]
status:
  description: The supervisor's status file content.
  returned: when it exists
  type: dict
  sample: {state: up, pid: 41235, ssh_pid: 41236, restarts: 0, last_error: null, started: "2026-11-24T10:00:00Z"}
files:
  description: Paths of the pid, status, spec, log and lock files and of the supervisor script.
  returned: always
  type: dict
  sample: {pid: /home/u/s1/s1.pid, status: /home/u/s1/s1.status.json, log: /home/u/s1/s1.log}
log_tail:
  description: Last lines of the tunnel log when the tunnel did not come up.
  returned: on failure
  type: str
"""

import json
import os
import sys

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hpc.interactive.plugins.module_utils._listeners import wait_port_owner
from ansible_collections.hpc.interactive.plugins.module_utils._tunnel import (
    TunnelError,
    build_ssh_argv,
    log_tail,
    probe,
    read_status,
    spec_document,
    spec_hash,
    start_detached,
    stop_tunnel,
    tunnel_paths,
    validate_name,
    validate_policy,
    validate_spec,
    wait_until_up,
    write_private,
)

SPEC_KEYS = ("remote_port", "local_host", "local_port", "dest_host", "dest_user", "dest_port", "jump_host",
             "jump_user", "jump_port", "identity_file", "known_hosts_policy", "known_hosts_file",
             "server_alive_interval", "server_alive_count_max", "connect_timeout")


class ReverseTunnel:
    """Read what runs, compare with what is asked, then act (unless in check mode)."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        try:
            self.name = validate_name(self.params["name"])
        except TunnelError as exc:
            module.fail_json(msg=str(exc), field=exc.field)
        self.state_dir = os.path.realpath(self.params["state_dir"])
        self.paths = tunnel_paths(self.state_dir, self.name)
        self.result = {"changed": False, "files": self.paths}

    def fail(self, msg: str, **extra) -> None:
        self.module.fail_json(msg=msg, **dict(self.result, **extra))

    def ensure_state_dir(self) -> None:
        try:
            st = os.stat(self.state_dir)
        except FileNotFoundError:
            self.result["changed"] = True
            if not self.module.check_mode:
                try:
                    os.makedirs(self.state_dir, mode=0o700)
                    os.chmod(self.state_dir, 0o700)
                except OSError as exc:
                    self.fail("cannot create state_dir %s: %s" % (self.state_dir, exc), field="state_dir")
            return
        if st.st_uid != os.getuid():
            self.fail("state_dir %s is owned by uid %d, not by us" % (self.state_dir, st.st_uid), field="state_dir")
        if st.st_mode & 0o777 != 0o700:
            self.result["changed"] = True
            if not self.module.check_mode:
                os.chmod(self.state_dir, 0o700)

    def running_spec(self) -> str:
        try:
            with open(self.paths["spec"]) as fh:
                return json.dumps(json.load(fh).get("ssh", {}), indent=2, sort_keys=True) + "\n"
        except (OSError, ValueError, AttributeError):
            return ""

    def present(self) -> None:
        p = self.params
        raw = {k: p[k] for k in SPEC_KEYS}
        raw["ssh_bin"] = p["ssh_executable"] or self.module.get_bin_path("ssh", required=True)
        try:
            spec = validate_spec(raw)
            policy = validate_policy({"max_failures": p["restart_max_failures"], "failure_window": p["restart_window"],
                                      "backoff_max": p["restart_backoff_max"]})
        except TunnelError as exc:
            self.fail(str(exc), field=exc.field)
        digest = spec_hash(spec, policy)
        self.result.update(ssh_argv=build_ssh_argv(spec), port=spec["remote_port"], tunnel_state="up", restarts=0)
        now = probe(self.state_dir, self.name) if os.path.isdir(self.state_dir) else {"running": False}
        same = bool(now["running"] and now["status"].get("spec_hash") == digest)
        if self.module._diff:
            after = json.dumps(spec, indent=2, sort_keys=True) + "\n"
            before = self.running_spec() if now["running"] else ""
            self.result["diff"] = {"before": before, "after": after, "before_header": self.paths["spec"],
                                   "after_header": self.paths["spec"]}
        self.ensure_state_dir()
        if same:
            status = now["status"]
            if not now["healthy"] and not self.module.check_mode:
                status = wait_until_up(self.state_dir, self.name, now["pid"], p["timeout"])
                self.check_up(status)
            self.report(status)
            return
        self.result["changed"] = True
        if self.module.check_mode:
            self.module.exit_json(**self.result)
        self.check_local_owner(spec)
        stop_tunnel(self.state_dir, self.name, p["stop_timeout"])
        write_private(self.paths["spec"], spec_document(self.name, spec, policy))
        try:
            os.unlink(self.paths["status"])
        except FileNotFoundError:
            pass
        proc = start_detached(p["python"] or sys.executable, self.state_dir, self.name, self.paths["spec"])
        status = wait_until_up(self.state_dir, self.name, proc.pid, p["timeout"], proc)
        self.check_up(status)
        self.report(status)

    def check_local_owner(self, spec: dict) -> None:
        """With local_owner_timeout: the local end must be this user's listener before anything is forwarded to it."""
        timeout, pid = self.params["local_owner_timeout"], self.params["local_owner_pid"]
        if not timeout:
            return
        address = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1"}.get(spec["local_host"])
        if address is None:
            self.fail("local_owner_timeout needs a loopback local_host, got %s" % spec["local_host"],
                      field="local_host")
        still = None if pid is None else (lambda: os.path.exists("/proc/%d" % pid))
        got = wait_port_owner(spec["local_port"], os.geteuid(), timeout, still=still)
        if got.state == "foreign":
            self.fail("local_port: %s; the tunnel is not opened, so that its requests cannot reach that user"
                      % got.message, field="local_port", tunnel_state="refused")
        if not got.ok:
            gone = pid is not None and still is not None and not still()
            self.fail("local_port: %s %s; the tunnel is not opened" % (
                got.message, "(process %d is gone)" % pid if gone else "after %s s" % timeout),
                field="local_port", tunnel_state="refused")

    def check_up(self, status: dict) -> None:
        if status.get("state") == "up":
            return
        stop_tunnel(self.state_dir, self.name, self.params["stop_timeout"])
        self.fail("tunnel %s did not come up: %s" % (self.name, status.get("last_error") or status.get("state")),
                  status=read_status(self.paths["status"]) or status, tunnel_state="failed",
                  log_tail=log_tail(self.state_dir, self.name))

    def report(self, status: dict) -> None:
        self.result.update(status=status, restarts=status.get("restarts", 0))
        if status.get("pid"):
            self.result.update(pid=status["pid"], ssh_pid=status.get("ssh_pid"))
        if status.get("allocated_port"):
            self.result["port"] = status["allocated_port"]
        self.module.exit_json(**self.result)

    def absent(self) -> None:
        self.result["tunnel_state"] = "stopped"
        if self.module._diff:
            self.result["diff"] = {"before": self.running_spec(), "after": "", "before_header": self.paths["spec"],
                                   "after_header": self.paths["spec"]}
        if not os.path.isdir(self.state_dir):
            self.module.exit_json(**self.result)
        if self.module.check_mode:
            self.result["changed"] = probe(self.state_dir, self.name)["running"] or os.path.exists(self.paths["pid"])
        else:
            self.result["changed"] = stop_tunnel(self.state_dir, self.name, self.params["stop_timeout"])
        status = read_status(self.paths["status"])
        if status:
            self.result["status"] = status
        self.module.exit_json(**self.result)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            state_dir=dict(type="path", required=True),
            remote_port=dict(type="int"),
            local_host=dict(type="str", default="127.0.0.1"),
            local_port=dict(type="int"),
            dest_host=dict(type="str"),
            dest_user=dict(type="str"),
            dest_port=dict(type="int", default=22),
            jump_host=dict(type="str"),
            jump_user=dict(type="str"),
            jump_port=dict(type="int"),
            identity_file=dict(type="path"),
            known_hosts_policy=dict(type="str", choices=["strict", "accept-new", "no"], default="strict"),
            known_hosts_file=dict(type="path"),
            server_alive_interval=dict(type="int", default=15),
            server_alive_count_max=dict(type="int", default=3),
            connect_timeout=dict(type="int", default=10),
            timeout=dict(type="float", default=30),
            stop_timeout=dict(type="float", default=5),
            restart_max_failures=dict(type="int", default=8),
            restart_window=dict(type="int", default=300),
            restart_backoff_max=dict(type="int", default=30),
            local_owner_timeout=dict(type="float", default=0),
            local_owner_pid=dict(type="int"),
            python=dict(type="path"),
            ssh_executable=dict(type="path"),
        ),
        required_if=[("state", "present", ("remote_port", "local_port", "dest_host"))],
        required_by={"jump_user": "jump_host", "jump_port": "jump_host"},
        supports_check_mode=True,
    )
    tunnel = ReverseTunnel(module)
    if module.params["state"] == "present":
        tunnel.present()
    else:
        tunnel.absent()


if __name__ == "__main__":
    main()
