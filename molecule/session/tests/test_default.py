"""Testinfra checks on the session scenario's host (molecule verify): the converged port reservation directory and
the session the side effect started there, seen from the host itself."""
from __future__ import annotations

import json

import pytest

PORTS_DIR = "/tmp/molhpci-ports"
SESSION = "/tmp/molhpci-sessions/molecule-session"


def test_port_reservation_dir_is_root_owned_sticky_and_world_writable(host):
    ports = host.file(PORTS_DIR)
    assert ports.is_directory and not ports.is_symlink
    assert (ports.user, ports.group, ports.mode) == ("root", "root", 0o1777)


@pytest.fixture
def service(host):
    return json.loads(host.file(f"{SESSION}/service.json").content_string)


def test_the_session_runs_and_its_files_are_private(host, service):
    assert service["JOB_STATUS"] == "Running" and service["URL"] == "/me", service
    assert host.file(SESSION).mode == 0o700
    for name in ("state.json", "secret"):
        assert host.file(f"{SESSION}/{name}").mode == 0o600, name
    state = json.loads(host.file(f"{SESSION}/state.json").content_string)
    assert state["step"] == "running" and state["ports"]["workspace"] == int(service["PORT"])


def test_nginx_serves_the_session_on_the_host_and_checks_the_secret(host, service):
    port = service["PORT"]
    assert host.socket(f"tcp://127.0.0.1:{port}").is_listening
    url = f"http://127.0.0.1:{port}/me/{port}/"
    header = f"{SESSION}/.molecule-auth"
    host.run(f"umask 077; printf 'Authorization: Bearer %s\\n' \"$(cat {SESSION}/secret)\" > {header}")
    try:
        with_secret = host.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' -H @{header} {url}")
    finally:
        host.run(f"rm -f {header}")
    without = host.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' {url}")
    assert (with_secret, without) == ("200", "401")
