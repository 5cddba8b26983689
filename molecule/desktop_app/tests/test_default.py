"""Testinfra checks after converge (molecule verify): the app runs in the desktop, its window maximised."""
from __future__ import annotations

import json
import re

SESSION = "/tmp/molecule-desktop_app/sessions/molecule-desktopapp"  # noqa: S108 - the scenario's own


def test_session_running(host):
    service = json.loads(host.file(f"{SESSION}/service.json").content_string)
    assert service["JOB_STATUS"] == "Running", service
    assert host.socket(f"tcp://127.0.0.1:{service['PORT']}").is_listening


def test_the_app_window_is_maximised(host):
    display = host.file(f"{SESSION}/vnc/display").content_string.strip()
    env = f"DISPLAY=:{display} XAUTHORITY={SESSION}/vnc/Xauthority"
    out = ""
    for _i in range(50):
        out = host.run(f"{env} wmctrl -lG").stdout
        if "xterm" in out.lower() or re.search(r"@\S+: ", out):
            break
        host.run("sleep 0.2")
    rows = [line.split(None, 7) for line in out.splitlines()]
    app = [r for r in rows if len(r) == 8 and ("xterm" in r[7].lower() or "@" in r[7])]
    assert app, out
    width, height = int(app[0][4]), int(app[0][5])
    assert width >= 1200 and height >= 700, out  # the 1280x800 desktop less the panel and title bar
