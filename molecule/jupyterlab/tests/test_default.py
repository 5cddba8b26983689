"""Testinfra checks after the jupyterlab role's install entry point (molecule verify), run on the namespace host."""
from __future__ import annotations

PREFIX = "/opt/hpc-interactive/apps/jupyterlab"


def test_venv_is_root_owned_and_world_readable(host):
    for path in (PREFIX, f"{PREFIX}/bin", f"{PREFIX}/lib"):
        f = host.file(path)
        assert f.is_directory and f.user == "root" and f.mode & 0o005 == 0o005, path
    exe = host.file(f"{PREFIX}/bin/jupyter-lab")
    assert exe.exists and exe.mode & 0o005 == 0o005


def test_venv_uses_the_system_python(host):
    assert "home = /usr/bin" in host.file(f"{PREFIX}/pyvenv.cfg").content_string


def test_jupyterlab_4_runs_as_an_unprivileged_user(host):
    out = host.run(f"runuser -u nobody -- env HOME=/tmp {PREFIX}/bin/jupyter-lab --version")
    assert out.rc == 0 and out.stdout.strip().split(".")[0] == "4", out.stdout + out.stderr
    imports = host.run(f"runuser -u nobody -- {PREFIX}/bin/python -c 'import jupyterlab, ipykernel; print(\"ok\")'")
    assert imports.rc == 0 and imports.stdout.strip() == "ok", imports.stderr


def test_port_reservation_dir_is_root_owned_sticky_and_world_writable(host):
    ports = host.file("/tmp/isession-ports")
    assert ports.is_directory and not ports.is_symlink
    assert (ports.user, ports.group, ports.mode) == ("root", "root", 0o1777)
