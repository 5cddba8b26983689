"""Sessions started as root, the way the README's first command (`bash scripts/run SERVICE`) starts them.

Jupyter refuses root unless told, and a root nginx master drops its workers to "nobody", which cannot reach a
0700 session directory: each service must still reach Running as root on the workspace, answer with the
secret only, and leave nothing after the cancel.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, also under --import-mode=importlib
from cli_support import Cli  # noqa: E402
from sessions_common import http_get, listening, session_processes, wait_until  # noqa: E402

pytestmark = pytest.mark.bed

# service -> (path under the base path, header with {secret}, status without the secret)
CHECKS = {
    "nginx": ("", "Authorization: Bearer {secret}", 401),
    "jupyterlab": ("api/status", "Authorization: token {secret}", 403),
    "notebook": ("api/status", "Authorization: token {secret}", 403),
    "code_server": ("healthz", None, None),  # code-server's own health page; its login is tested elsewhere
}


@pytest.mark.parametrize("service", sorted(CHECKS))
def test_session_started_as_root_runs_and_cancels(bed, apps, service):
    cli = Cli(bed, user="root", inventory=False)
    sid = f"root-{service.replace('_', '')}-{int(time.time()) % 100000}"
    res = cli.run("start", service, "--id", sid, "-e", "session_start_timeout=90", timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    svc = cli.service(sid)
    assert svc["JOB_STATUS"] == "Running", svc
    port = int(svc["PORT"])
    secret = (cli.root / sid / "secret").read_text().strip()
    path, header, denied = CHECKS[service]
    url = f"http://127.0.0.1:{port}{svc['URL']}/{port}/{path}"
    status, _ignored = http_get(bed, "workspace", url, header.format(secret=secret) if header else None, cli.tmp,
                                user="root")
    assert status == 200, (service, status)
    if denied is not None:
        status, _ignored = http_get(bed, "workspace", url, None, cli.tmp, user="root")
        assert status == denied, (service, status)
    cancel = cli.run("cancel", sid, timeout=120)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert cli.service(sid)["JOB_STATUS"] == "Cancelled"
    assert wait_until(lambda: not listening(bed, "workspace", port), 10)
    cli.stop_watcher()  # the user's watcher names the first session's inventory in its argv; it is not a leftover
    assert wait_until(lambda: not session_processes(sid), 10), session_processes(sid)
