"""Testinfra checks on the namespace host after converge (molecule verify): the packages, the session's sockets, and
noVNC's page under the session's base path."""
from __future__ import annotations

import json

import pytest

SESSION = "/tmp/molecule-vnc/sessions/molecule-vnc"  # noqa: S108 - the scenario's own


@pytest.fixture
def service(host):
    return json.loads(host.file(f"{SESSION}/service.json").content_string)


@pytest.mark.parametrize("pkg", ["tigervnc-standalone-server", "tigervnc-tools", "novnc", "websockify", "xfce4"])
def test_packages(host, pkg):
    assert host.package(pkg).is_installed


def test_session_running_with_websockify_on_loopback_only(host, service):
    assert service["JOB_STATUS"] == "Running", service
    port = int(service["PORT"])
    assert host.socket(f"tcp://127.0.0.1:{port}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening


def test_xvnc_has_no_tcp_port_and_a_0600_unix_socket(host):
    display = int(host.file(f"{SESSION}/vnc/display").content_string)
    assert not host.socket(f"tcp://127.0.0.1:{5900 + display}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{6000 + display}").is_listening
    sock = host.file(f"{SESSION}/vnc/rfb.sock")
    assert sock.is_socket and sock.mode == 0o600
    assert host.file(f"/tmp/.X{display}-lock").exists  # noqa: S108 - the X server's lock
    for name in ("password", "passwd", "Xauthority"):
        assert host.file(f"{SESSION}/vnc/{name}").mode == 0o600, name


def test_novnc_page_under_the_base_path(host, service):
    port = service["PORT"]
    base = f"http://127.0.0.1:{port}/me/{port}/"
    page = host.check_output(f"curl -s {base}vnc.html")
    assert "<title>noVNC</title>" in page
    index = host.check_output(f"curl -s {base}")
    assert "autoconnect=true" in index and "resize=scale" in index and "reconnect=true" in index
    assert host.run(f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/vnc.html").stdout == "404"


def test_the_desktop_runs(host):
    assert host.process.filter(comm="xfce4-session"), "no xfce4-session"
    assert host.process.filter(comm="Xvnc"), "no Xvnc"
