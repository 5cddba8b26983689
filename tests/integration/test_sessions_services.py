"""The other service roles through the session role: start_<service> on the workspace and on Slurm compute ->
Running -> the app's page with the secret (header from the service's spec), 401/403/login without -> cancel ->
nothing left. Skipped when a service's software is not installed on the bed (its install entry point does that)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sessions_common import (  # noqa: E402
    WS_USER,
    failure_text,
    http_get,
    listening,
    read_json,
    reservations,
    run_playbook,
    session_processes,
    wait_until,
)
from sessions_common import cluster_inventory  # noqa: E402

pytestmark = pytest.mark.bed
JUPYTER = ("jupyterlab", "notebook")
# what the app's own page says (read with the secret)
PAGE_MARK = {"jupyterlab": "JupyterLab", "notebook": "Jupyter Notebook"}


@pytest.mark.parametrize("target", ["workspace", "compute"])
@pytest.mark.parametrize("service", JUPYTER)
def test_service_session_end_to_end(bed, apps, service, target):
    root = bed.user_tmpdir(WS_USER) / "sessions"
    inv = cluster_inventory(bed, "slurm") if target == "compute" else None
    sid = f"{service}-{target}-{int(time.time())}"
    common = dict(session_id=sid, session_root=str(root))
    extra = dict(common, session_target=target, session_start_timeout=120)
    if target != "workspace":
        extra["session_resource"] = "controller"
    t0 = time.monotonic()
    res = run_playbook(bed, f"hpc.interactive.start_{service}", extra, inventory=inv)
    assert res.rc == 0, failure_text(res)
    print(f"{service} on {target}: start took {time.monotonic() - t0:.2f} s")
    sdir = root / sid
    service_json = read_json(sdir / "service.json")
    assert service_json["JOB_STATUS"] == "Running"
    port, slug = int(service_json["PORT"]), service_json["SLUG"]
    secret = (sdir / "secret").read_text().strip()
    tmp = bed.user_tmpdir(WS_USER)
    url = f"http://127.0.0.1:{port}/me/{port}/{slug}"
    code, body = http_get(bed, "workspace", url, f"Authorization: token {secret}", tmp)
    assert code == 200 and PAGE_MARK[service] in body, (code, body[:300])
    code, body = http_get(bed, "workspace", url, None, tmp)
    assert code in (302, 401, 403) or "login" in body.lower(), (code, body[:300])
    assert secret not in res.stdout

    res = run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
    assert res.rc == 0, failure_text(res)
    assert read_json(sdir / "service.json")["JOB_STATUS"] == "Cancelled"
    assert wait_until(lambda: not listening(bed, "workspace", port), 10)
    assert wait_until(lambda: not session_processes(sid), 15), session_processes(sid)
    assert reservations(sid) == []
