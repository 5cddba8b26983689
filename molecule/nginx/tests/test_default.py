"""Testinfra checks after the nginx role's install entry point (molecule verify), run on the namespace host."""
from __future__ import annotations


def test_nginx_installed_and_runs_as_a_user(host):
    assert host.package("nginx-light").is_installed
    out = host.run("runuser -u nobody -- /usr/sbin/nginx -v")
    assert out.rc == 0 and "nginx version: nginx/1." in out.stderr, out.stderr


def test_port_reservation_dir_is_root_owned_sticky_and_world_writable(host):
    ports = host.file("/tmp/isession-ports")
    assert ports.is_directory and not ports.is_symlink
    assert (ports.user, ports.group, ports.mode) == ("root", "root", 0o1777)


def test_the_host_is_its_own_network(host):
    """The checks ran on the namespace host: its only addresses are loopback and its veth end."""
    addrs = host.check_output("ip -o -4 addr show | awk '{print $4}'").split()
    assert sorted(addrs) == ["10.213.1.2/24", "127.0.0.1/8"], addrs
