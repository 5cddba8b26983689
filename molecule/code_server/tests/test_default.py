"""Testinfra checks after the code_server role's install entry point (molecule verify), run on the namespace host."""
from __future__ import annotations

PREFIX = "/opt/hpc-interactive/apps/code-server"


def test_code_server_runs_as_an_unprivileged_user(host):
    exe = host.file(f"{PREFIX}/bin/code-server")
    assert exe.exists and exe.user == "root" and exe.mode & 0o005 == 0o005
    out = host.run(f"runuser -u nobody -- env HOME=/tmp {PREFIX}/bin/code-server --config /dev/null --version")
    assert out.rc == 0 and out.stdout.startswith("4.100.3 "), out.stdout + out.stderr


def test_its_helpers_are_installed(host):
    for package in ("nginx-light", "ripgrep"):
        assert host.package(package).is_installed, package


def test_port_reservation_dir_is_root_owned_sticky_and_world_writable(host):
    ports = host.file("/tmp/isession-ports")
    assert (ports.user, ports.group, ports.mode) == ("root", "root", 0o1777)
