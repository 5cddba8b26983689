"""Every start playbook ends by saying how to reach and end the session (roles/session/tasks/summary.yml).

Run as wsuser on the bed: the message's service.json is the session's, its URL serves the app (with the secret),
and its cancel command, run as printed, ends the session. In check mode nothing is started and the message says
what a start would make. A compute start's cancel command names the inventory the cancel needs.
"""
from __future__ import annotations

import re
import shlex
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, also under --import-mode=importlib
from sessions_common import (  # noqa: E402
    WS_USER,
    cluster_inventory,
    failure_text,
    http_get,
    queue,
    read_json,
    reservations,
    run_playbook,
    task_results,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
TASK = "Say how to reach and end the session"


def summary(res) -> list:
    """The lines of the summary task; it must be the play's last task."""
    names = [t["task"]["name"] for t in res.tasks()]
    assert names and names[-1].endswith(f" : {TASK}"), names[-5:]
    (result,) = task_results(res, TASK)
    return result["msg"]


def line(lines: list, key: str) -> str:
    found = [s.split(": ", 1)[1] for s in lines if s.startswith(f"{key}: ")]
    assert len(found) == 1, lines
    return found[0]


def test_every_start_playbook_ends_with_the_shared_summary():
    """Structure: each start playbook's last task is the session role's start, whose last step is summary.yml."""
    for play in sorted((REPO / "playbooks").glob("start_*.yml")):
        tasks = yaml.safe_load(play.read_text())[-1]["tasks"]
        last = tasks[-1]["ansible.builtin.import_role"]
        assert last == {"name": "hpc.interactive.session", "tasks_from": "start"}, play.name
    start = yaml.safe_load((REPO / "roles" / "session" / "tasks" / "start.yml").read_text())
    assert start[-1] == {"name": TASK, "ansible.builtin.import_tasks": "summary.yml", "tags": ["session_without_cli"]}
    # isession skips that tag (it prints its own result and ensures the watcher itself): only the summary and the
    # two watcher includes carry it
    tagged = [t["name"] for t in start + start[2]["block"] if "session_without_cli" in t.get("tags", [])]
    assert sorted(tagged) == sorted([TASK, "Ensure the user's watcher runs, for a start without the CLI",
                                     "Ensure the user's watcher runs, so that a job that ends while its app starts"
                                     " is seen at once"])


@pytest.mark.bed
def test_workspace_start_says_its_id_file_url_and_a_cancel_that_works(bed):
    root = bed.user_tmpdir(WS_USER) / "sessions"
    sid = f"nginx-sum-{int(time.time())}"
    res = run_playbook(bed, "hpc.interactive.start_nginx", {"session_id": sid, "session_root": str(root),
                                                            "session_start_timeout": 30})
    assert res.rc == 0, failure_text(res)
    lines = summary(res)
    assert lines[0] == f"session {sid} (Running)"
    assert line(lines, "service.json") == f"{root}/{sid}/service.json"
    service = read_json(root / sid / "service.json")
    url = line(lines, "url")
    assert url == f"http://127.0.0.1:{service['PORT']}/me/{service['PORT']}/"
    secret = (root / sid / "secret").read_text().strip()
    code, _ignored = http_get(bed, "workspace", url, f"Authorization: Bearer {secret}", bed.user_tmpdir(WS_USER))
    assert code == 200
    cancel = line(lines, "cancel")
    command, _ignored, alternative = cancel.partition("  (or: ")
    assert alternative == f"isession cancel {sid})"
    assert command == f"ansible-playbook hpc.interactive.cancel -e session_id={sid} -e session_root={root}"
    # the command as printed ends the session
    argv = shlex.split(command)
    argv[0] = str(bed.venv / "bin" / "ansible-playbook")
    run = bed.run("workspace", argv, user=WS_USER, env=bed.ansible_env(), timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Cancelled"
    assert reservations(sid) == []


@pytest.mark.bed
def test_check_mode_says_what_a_start_would_make_and_starts_nothing(bed):
    root = bed.user_tmpdir(WS_USER) / "sessions"
    sid = f"nginx-chk-{int(time.time())}"
    res = bed.playbook_json("---\n- name: Run\n  ansible.builtin.import_playbook: hpc.interactive.start_nginx\n",
                            user=WS_USER, check=True,
                            extra_vars={"session_id": sid, "session_root": str(root), "session_start_timeout": 5})
    assert res.rc == 0, failure_text(res)
    lines = summary(res)
    assert lines[0] == f"check mode: nothing was started; a start would make {sid}"
    assert line(lines, "service.json") == f"{root}/{sid}/service.json"
    assert re.fullmatch(r"http://127\.0\.0\.1:(\d+)/me/\1/", line(lines, "url")), lines
    assert line(lines, "cancel").startswith(f"ansible-playbook hpc.interactive.cancel -e session_id={sid} ")
    assert not (root / sid).exists()
    assert reservations(sid) == []


@pytest.mark.bed
def test_compute_start_names_the_inventory_its_cancel_needs(bed):
    root = bed.user_tmpdir(WS_USER) / "sessions"
    inv = cluster_inventory(bed, "slurm")
    sid = f"nginx-sumc-{int(time.time())}"
    common = {"session_id": sid, "session_root": str(root)}
    res = run_playbook(bed, "hpc.interactive.start_nginx",
                       dict(common, session_target="compute", session_resource="controller",
                            session_start_timeout=60), inventory=inv)
    try:
        assert res.rc == 0, failure_text(res)
        cancel = line(summary(res), "cancel")
        assert f" -i {inv}  (or: isession cancel {sid})" in cancel
        argv = shlex.split(cancel.partition("  (or: ")[0])
        argv[0] = str(bed.venv / "bin" / "ansible-playbook")
        run = bed.run("workspace", argv, user=WS_USER, env=bed.ansible_env(), timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 20)
    finally:
        run_playbook(bed, "hpc.interactive.cancel", common, inventory=inv)
