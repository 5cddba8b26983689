"""Testinfra checks after the jupyterlab role's install entry point (molecule verify)."""
from __future__ import annotations

PREFIX = "/opt/hpc-interactive/apps/jupyterlab"


def test_venv_is_world_readable(host):
    for path in (PREFIX, f"{PREFIX}/bin", f"{PREFIX}/lib"):
        f = host.file(path)
        assert f.is_directory and f.user == "root" and f.mode & 0o005 == 0o005, path
    exe = host.file(f"{PREFIX}/bin/jupyter-lab")
    assert exe.exists and exe.mode & 0o005 == 0o005


def test_venv_uses_the_system_python(host):
    cfg = host.file(f"{PREFIX}/pyvenv.cfg").content_string
    assert "home = /usr/bin" in cfg


def test_jupyterlab_4_installed(host):
    version = host.check_output(f"{PREFIX}/bin/jupyter-lab --version").strip()
    assert version.split(".")[0] == "4", version


def test_runs_as_an_unprivileged_user(host):
    cmd = host.run(f"runuser -u nobody -- {PREFIX}/bin/python -c 'import jupyterlab, ipykernel; print(\"ok\")'")
    assert cmd.rc == 0 and cmd.stdout.strip() == "ok", cmd.stderr
