"""Sessions on the controller target: the agent runs detached on the controller, reverse_tunnel (delegated to the
controller) forwards the workspace port to the server's controller port. Same checks as the workspace target,
per host: no listener on the workspace port nor on the controller port, no session process left."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sessions_common import (  # noqa: E402
    WS_USER,
    assert_no_secret_in_argv,
    cluster_inventory,
    failure_text,
    http_get,
    listening,
    read_json,
    reservations,
    run_playbook,
    session_processes,
    wait_until,
)

pytestmark = pytest.mark.bed


@pytest.fixture
def root(bed):
    return bed.user_tmpdir(WS_USER) / "sessions"


def test_nginx_on_controller_start_serve_cancel_twice(bed, root):
    inv = cluster_inventory(bed)
    sid = f"nginx-ctl-{int(time.time())}"
    common = dict(session_id=sid, session_root=str(root))
    t0 = time.monotonic()
    res = run_playbook(bed, "hpc.interactive.start_nginx",
                       dict(common, session_target="controller", session_resource="controller",
                            session_start_timeout=60), inventory=inv)
    took = time.monotonic() - t0
    assert res.rc == 0, failure_text(res)
    sdir = root / sid
    service = read_json(sdir / "service.json")
    port = int(service["PORT"])
    assert service["JOB_STATUS"] == "Running" and service["URL"] == "/me"
    state = read_json(sdir / "state.json")
    node_port, rdir = state["ports"]["node"], Path(state["remote_dir"])
    assert state["target"] == "controller" and state["step"] == "running" and state["job_id"]
    assert rdir.name == sid and (rdir / "secret").read_text() == (sdir / "secret").read_text()
    assert (rdir / "secret").stat().st_mode & 0o777 == 0o600 and rdir.stat().st_mode & 0o777 == 0o700
    secret = (sdir / "secret").read_text().strip()
    assert secret not in res.stdout and secret not in (rdir / "agent.sh").read_text()
    assert_no_secret_in_argv(secret)
    assert listening(bed, "controller", node_port) and listening(bed, "workspace", port)
    tmp = bed.user_tmpdir(WS_USER)
    url = f"http://127.0.0.1:{port}/me/{port}/"
    code, body = http_get(bed, "workspace", url, f"Authorization: Bearer {secret}", tmp)
    assert code == 200 and f"hpc.interactive nginx session {sid}" in body
    assert http_get(bed, "workspace", url, None, tmp)[0] == 401
    print(f"controller start took {took:.2f} s")

    t0 = time.monotonic()
    res = run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
    assert res.rc == 0, failure_text(res)
    print(f"controller cancel took {time.monotonic() - t0:.2f} s")
    assert read_json(sdir / "service.json")["JOB_STATUS"] == "Cancelled"
    assert wait_until(lambda: not listening(bed, "workspace", port), 5)
    assert wait_until(lambda: not listening(bed, "controller", node_port), 5)
    for marker in (str(sdir), str(rdir)):
        assert wait_until(lambda m=marker: not session_processes(m), 5), session_processes(marker)
    assert reservations(sid) == []
    assert (rdir / "logs").is_dir()  # remote logs kept

    again = run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
    assert again.rc == 0, failure_text(again)
    changed = [t["task"]["name"] for t in again.tasks() for r in t["hosts"].values() if r.get("changed")]
    assert changed == [], changed
