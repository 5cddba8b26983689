"""The network: a namespace per host (``hpcbed-<host>``), veths on one bridge in ``hpcbed-net``, the hosts'
addresses, a UTS namespace per host for its hostname, and the hosts' names in /etc/hosts."""
from __future__ import annotations

import re
from pathlib import Path

from hpcbed.core import HOSTS, PREFIX, _sh, _write_in_place

NET_NS = "hpcbed-net"
BRIDGE = "br-hpcbed"
NETNS_DIR = Path("/run/netns")
ETC_HOSTS = Path("/etc/hosts")
HOSTS_BEGIN = "# BEGIN hpcbed (hpc.interactive test bed; removed by `tests/bed/bed down`)"
HOSTS_END = "# END hpcbed"


class NetworkMixin:
    """Namespaces, addresses and names of the bed's hosts."""

    @staticmethod
    def ns_name(host: str) -> str:
        return f"{PREFIX}-{host}"

    def netns_path(self, host: str) -> Path:
        self._check_host(host)
        return NETNS_DIR / self.ns_name(host)

    def uts_path(self, host: str) -> Path:
        self._check_host(host)
        return self.root / "uts" / host

    def _make_network(self) -> None:
        def ip(*args: str) -> None:
            _sh(["ip", *args])

        ip("netns", "add", NET_NS)
        ip("-n", NET_NS, "link", "set", "lo", "up")
        ip("-n", NET_NS, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", NET_NS, "link", "set", BRIDGE, "up")
        for host, addr in HOSTS.items():
            ns = self.ns_name(host)
            ip("netns", "add", ns)
            ip("-n", NET_NS, "link", "add", f"v-{host}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", NET_NS, "link", "set", f"v-{host}", "master", BRIDGE, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def _make_uts(self) -> None:
        for host in HOSTS:
            path = self.uts_path(host)
            path.touch()
            _sh(["unshare", f"--uts={path}", "hostname", host])

    def _write_etc_hosts(self) -> None:
        text = _strip_block(ETC_HOSTS.read_text())
        block = [HOSTS_BEGIN] + [f"{addr} {host}" for host, addr in HOSTS.items()] + [HOSTS_END]
        _write_in_place(ETC_HOSTS, text.rstrip("\n") + "\n" + "\n".join(block) + "\n")

    def _listening(self, host: str, port: int) -> bool:
        cp = _sh(["nsenter", f"--net={self.netns_path(host)}", "ss", "-Hltn", f"sport = :{port}"], check=False)
        return bool(cp.stdout.strip())


def _strip_block(text: str) -> str:
    return re.sub(rf"(?ms)^{re.escape(HOSTS_BEGIN)}\n.*?^{re.escape(HOSTS_END)}\n?", "", text)
