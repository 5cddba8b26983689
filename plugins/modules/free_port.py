#!/usr/bin/python
# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: free_port
short_description: Find free TCP ports on a host and reserve them for a session
version_added: 0.1.0
description:
  - Finds O(count) free TCP ports in a range on the host the task runs on and B(reserves) them for
    O(owner) (a session id), so that concurrent callers, of any user, never get the same port, even
    before a server binds it.
  - A reservation is a claim file per port in a host-local directory shared by all users, C(port-N) (or
    C(port-N.G) when junk of another user occupies the first name). Its record (session id, host, boot id,
    watched pid, created, lease expiry) is readable by its owner only (mode 0600); other users judge a claim by
    its metadata - its owner, one link, and its mtime, which is the lease's end. The record is published with an
    exclusive create (a private temp file, hard-linked to the claim's name, which fails if that name exists) and
    every claim of the port is looked at again afterwards, so exactly one caller, of any user, wins each port.
  - A port is free when no valid claim holds it and binding it on C(0.0.0.0), C(127.0.0.1)
    (and C(::) where IPv6 exists) succeeds without C(SO_REUSEADDR); a listener or a socket in
    TIME_WAIT makes it busy. X11's ports 6000-6099 are always skipped.
  - A reservation ends when its O(lease) expires, when the host rebooted, or when the watched
    O(pid) has exited. After the lease, the server's own listening socket protects the port.
    The caller's own invalid claims are removed; another user's cannot be removed from the sticky directory and
    are ignored when invalid (junk, an expired lease, a lease beyond 30 days, or a user holding more than 256 live
    claims in the directory). root removes any invalid claim. There is no lock another user could hold.
  - A user may hold at most 256 live reservations in one directory; a request beyond that fails naming O(count).
  - The same logic runs without Ansible, for batch jobs, as
    C(python3 -I _ports.py reserve --owner ID [--count N] [--range A-B] [--dir D] [--lease S] [--pid P])
    (prints JSON with C(ports)) and C(python3 -I _ports.py release --owner ID).
author:
  - hpc.interactive developers (@hpc-interactive)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reports the ports that would be reserved (or released) without creating or removing files.
  diff_mode:
    support: full
    details: Shows the owner's reserved ports before and after.
  platform:
    platforms: posix
options:
  owner:
    description:
      - The session id the ports are reserved for. 1-64 characters of C([A-Za-z0-9._-]), starting with
        a letter or digit.
    type: str
    required: true
  state:
    description:
      - V(present) reserves ports. If O(owner) already holds O(count) valid reservations made by the
        same user on this host, those are returned unchanged (C(changed=false)); their lease is not
        renewed.
      - V(absent) releases every reservation of O(owner) made by the calling user on this host.
    type: str
    choices: [present, absent]
    default: present
  count:
    description: How many ports to reserve (1-64).
    type: int
    default: 1
  port_range:
    description:
      - Where to look, as V(START-END), a single port, a list V([START, END]) or a mapping with
        C(start) and C(end). Ports below 1024 are refused.
      - Defaults to V(10000-32767); the Linux ephemeral range (see O(avoid_ephemeral)) and
        6000-6099 are removed from whatever range is used.
    type: raw
  exclude:
    description: Ports (V(8888)) or ranges (V(8000-8100)) never to return.
    type: list
    elements: raw
    default: []
  avoid_ephemeral:
    description:
      - Skip the kernel's ephemeral range (C(/proc/sys/net/ipv4/ip_local_port_range)), from which
        outgoing connections take their local ports.
    type: bool
    default: true
  lease:
    description: Seconds a reservation lasts (1 to 30 days) unless released earlier.
    type: int
    default: 3600
  pid:
    description:
      - A process id on this host; the reservation also ends when this process exits
        (its start time is recorded, so a reused pid does not keep it alive).
    type: int
  reservation_dir:
    description:
      - The shared reservation directory, owned by root with mode 1777 (sticky). The install entry point of every
        service role makes it and adds a C(tmpfiles.d) line that makes it again at boot. When it is missing, root
        creates it (root:root, 1777) and any other user is refused with the command an administrator runs.
      - Refused if it is a symlink, not a directory, owned by another user than root (that user could remove or
        block every reservation), writable by others without the sticky bit, or on a network file system (NFS,
        Lustre, GPFS and the like); it must be local to the host whose ports it guards. A directory owned by the
        caller and writable by nobody else is accepted (reservations private to that user).
      - It is opened once without following a symlink and used only through that descriptor, so it cannot be
        swapped between the check and the use.
      - Every caller on a host must use the same directory. Where C(/tmp) is private per user
        (polyinstantiated), set a directory outside it for all users.
    type: path
    default: /tmp/isession-ports
notes:
  - Reservations protect cooperating callers from each other. They do not stop a process from
    binding a port outside this scheme; what listens on a session's port is checked before the session is
    C(Running) (M(hpc.interactive.session_ready)) and by the watcher.
seealso:
  - module: hpc.interactive.reverse_tunnel
"""

EXAMPLES = r"""
- name: Reserve the workspace port of a session
  hpc.interactive.free_port:
    owner: "{{ isession_id }}"
  register: wsport

- name: Reserve two ports in a firewall-approved range, released when the agent exits
  hpc.interactive.free_port:
    owner: "{{ isession_id }}"
    count: 2
    port_range: 40000-40999
    avoid_ephemeral: false
    exclude: [40080, 40440-40450]
    pid: "{{ agent_pid }}"

- name: Release the session's ports
  hpc.interactive.free_port:
    owner: "{{ isession_id }}"
    state: absent
"""

RETURN = r"""
ports:
  description: The reserved ports, ascending. Empty for O(state=absent).
  returned: always
  type: list
  elements: int
  sample: [21457, 21458]
port:
  description: The first of RV(ports).
  returned: when O(state=present)
  type: int
  sample: 21457
reservation_dir:
  description: The reservation directory used.
  returned: always
  type: str
  sample: /tmp/isession-ports
released:
  description: The ports whose reservations were (or in check mode would be) removed.
  returned: when O(state=absent)
  type: list
  elements: int
  sample: [21457, 21458]
"""

from typing import Any, Dict, List

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.hpc.interactive.plugins.module_utils._ports import (
    DEFAULT_DIR,
    DEFAULT_LEASE,
    PortError,
    ReservationDir,
    build_candidates,
    check_request,
    validate_owner,
)


class FreePort:
    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.rdir = ReservationDir(self.params["reservation_dir"])
        self.owner = validate_owner(self.params["owner"])

    def held(self) -> List[int]:
        if not self.rdir.exists():
            return []
        self.rdir.validate()
        return sorted(r.port for r in self.rdir.held(self.owner))

    def present(self) -> Dict[str, Any]:
        p = self.params
        check_request(self.owner, p["count"], p["lease"], p["pid"])
        candidates = build_candidates(p["port_range"], p["exclude"], p["avoid_ephemeral"])
        before = self.held()
        if self.module.check_mode:
            ports, new = self.rdir.predict(self.owner, p["count"], candidates)
            if len(ports) < p["count"]:
                raise PortError("count", f"only {len(ports)} of {p['count']} ports are free in the range")
        else:
            ports, new = self.rdir.reserve(self.owner, p["count"], candidates, p["lease"], p["pid"])
        return {"changed": bool(new), "ports": ports, "port": ports[0],
                "diff": {"before": {"ports": before}, "after": {"ports": sorted(set(before) | set(ports))}}}

    def absent(self) -> Dict[str, Any]:
        before = self.held()
        released = self.rdir.release(self.owner, dry_run=self.module.check_mode)
        after = [port for port in before if port not in released]
        return {"changed": bool(released), "ports": [], "released": released,
                "diff": {"before": {"ports": before}, "after": {"ports": after}}}

    def run(self) -> None:
        result = self.present() if self.params["state"] == "present" else self.absent()
        if not self.module._diff:
            del result["diff"]
        self.module.exit_json(reservation_dir=self.rdir.path, **result)


ARGUMENT_SPEC = dict(
    owner=dict(type="str", required=True),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    count=dict(type="int", default=1),
    port_range=dict(type="raw"),
    exclude=dict(type="list", elements="raw", default=[]),
    avoid_ephemeral=dict(type="bool", default=True),
    lease=dict(type="int", default=DEFAULT_LEASE),
    pid=dict(type="int"),
    reservation_dir=dict(type="path", default=DEFAULT_DIR),
)

MODULE_OPTIONS = dict(supports_check_mode=True)


def run_module(module: AnsibleModule) -> None:
    """The module's work; also run inside the Ansible worker by the action plugin of the same name."""
    try:
        FreePort(module).run()
    except PortError as exc:
        module.fail_json(msg=str(exc), field=exc.field)


def main() -> None:
    run_module(AnsibleModule(argument_spec=ARGUMENT_SPEC, **MODULE_OPTIONS))


if __name__ == "__main__":
    main()
