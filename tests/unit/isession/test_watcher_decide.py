"""The JOB_STATUS table as the watcher applies it (pure ``decide``), from data-driven cases."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from isession.watcher import decide, group_key

CASES = yaml.safe_load((Path(__file__).parent / "fixtures" / "job_status_table.yml").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_job_status_table(case):
    d = decide(case["record"], case["current"], case["info"], case.get("reachable", True),
               absent=case.get("absent", 0))
    want = case["expect"]
    assert d.status == want["status"]
    assert d.absent == want["absent"]
    if "message" in want:
        if want["message"] == "":
            assert d.message == ""
        else:
            assert want["message"] in d.message
    assert d.terminal == (want["status"] in ("Cancelled", "Completed", "Failed"))


def test_absence_must_be_confirmed_in_a_row():
    rec = {"step": "running", "job_id": "9"}
    absent = 0
    seen = []
    for info in (None, None, {"state": "running", "found": True}, None, None):
        d = decide(rec, "Running", info, True, absent=absent)
        absent = d.absent
        seen.append(d.status)
    assert seen == [None, None, None, None, None]  # the sighting in between reset the count
    assert decide(rec, "Running", None, True, absent=absent).status == "Failed"


def test_confirm_count_is_configurable():
    rec = {"step": "running", "job_id": "9"}
    assert decide(rec, "Running", None, True, absent=0, confirm=1).status == "Failed"


@pytest.mark.parametrize(("record", "key"), [
    ({"target": "workspace", "scheduler": "local"}, ("", "local")),
    ({"target": "compute", "resource": "controller", "scheduler": "pbs"}, ("controller", "pbs")),
    ({"target": "controller", "resource": "ctl", "scheduler": "local"}, ("ctl", "local")),
    ({"target": "compute", "resource": "ctl"}, ("ctl", "slurm")),
])
def test_group_key(record, key):
    assert group_key(record) == key
