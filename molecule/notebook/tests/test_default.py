"""Testinfra checks after the notebook role's install entry point (molecule verify), run on the namespace host."""
from __future__ import annotations

PREFIX = "/opt/hpc-interactive/apps/notebook"


def test_venv_is_root_owned_and_world_readable(host):
    for path in (PREFIX, f"{PREFIX}/bin", f"{PREFIX}/lib"):
        f = host.file(path)
        assert f.is_directory and f.user == "root" and f.mode & 0o005 == 0o005, path
    assert "home = /usr/bin" in host.file(f"{PREFIX}/pyvenv.cfg").content_string


def test_notebook_7_runs_as_an_unprivileged_user(host):
    out = host.run(f"runuser -u nobody -- env HOME=/tmp {PREFIX}/bin/jupyter-notebook --version")
    assert out.rc == 0 and out.stdout.strip().split(".")[0] == "7", out.stdout + out.stderr


def test_port_reservation_dir_is_root_owned_sticky_and_world_writable(host):
    ports = host.file("/tmp/isession-ports")
    assert (ports.user, ports.group, ports.mode) == ("root", "root", 0o1777)
