"""Testinfra checks after converge (molecule verify): without its vendor's software, a matlab session fails at once,
naming what is missing on which host, and leaves nothing running."""
from __future__ import annotations

import json

SESSION = "/tmp/molecule-matlab/sessions/molecule-matlab"  # noqa: S108 - the scenario's own


def test_failed_naming_what_is_missing_on_which_host(host):
    service = json.loads(host.file(f"{SESSION}/service.json").content_string)
    hostname = host.check_output("hostname")
    assert service["JOB_STATUS"] == "Failed", service
    assert service["ERROR_MESSAGE"] == f"matlab not found on {hostname}", service


def test_nothing_left_running(host):
    service = json.loads(host.file(f"{SESSION}/service.json").content_string)
    assert not host.socket(f"tcp://127.0.0.1:{service['PORT']}").is_listening
    left = host.run("grep -lz 'ISESSION_ID=molecule-matlab' /proc/[0-9]*/environ 2>/dev/null").stdout.split()
    assert left == [], left
    owner = '"owner": "molecule-matlab"'
    assert host.run(f"grep -lF '{owner}' /tmp/isession-ports/port-* /tmp/isession-displays/port-*").stdout == ""
