"""Run the service_json module for real (a subprocess, args file) on a temp directory."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest


@pytest.fixture
def sdir(tmp_path):
    d = tmp_path / "session"
    d.mkdir()
    return d


def listing(d: Path):
    return sorted(p.name for p in d.iterdir())


def test_check_run_idempotent_diff_absent(run_module, sdir):
    path = sdir / "service.json"
    args = {"path": str(path), "url": "/me", "port": 56321, "slug": "lab", "job_status": "Starting"}

    res = run_module("service_json", args, check=True, diff=True)
    assert res["_rc"] == 0 and res["changed"] is True
    assert not path.exists() and listing(sdir) == []  # check mode wrote nothing
    assert res["diff"]["before"] == "" and '"PORT": "56321"' in res["diff"]["after"]
    predicted = res["diff"]["after"]

    res = run_module("service_json", args, diff=True)
    assert res["_rc"] == 0 and res["changed"] is True
    assert path.read_text() == predicted  # check mode predicted exactly what was written
    assert res["content"] == {"URL": "/me", "PORT": "56321", "SLUG": "lab", "JOB_STATUS": "Starting",
                              "ERROR_MESSAGE": ""}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert listing(sdir) == ["service.json"]

    res = run_module("service_json", dict(args, port="56321"), diff=True)  # same port as a string: same content
    assert res["_rc"] == 0 and res["changed"] is False and "diff" not in res
    mtime = path.stat().st_mtime_ns

    res = run_module("service_json", {"path": str(path), "job_status": "Running"}, check=True, diff=True)
    assert res["changed"] is True and '"JOB_STATUS": "Starting"' in res["diff"]["before"]
    assert '"JOB_STATUS": "Running"' in res["diff"]["after"]
    assert path.stat().st_mtime_ns == mtime and '"Starting"' in path.read_text()

    res = run_module("service_json", {"path": str(path), "job_status": "Running"}, diff=True)
    assert res["changed"] is True and json.loads(path.read_text())["JOB_STATUS"] == "Running"
    assert json.loads(path.read_text())["SLUG"] == "lab"  # keys not given are kept

    res = run_module("service_json", {"path": str(path), "state": "absent"}, check=True, diff=True)
    assert res["changed"] is True and path.exists()
    res = run_module("service_json", {"path": str(path), "state": "absent"}, diff=True)
    assert res["_rc"] == 0 and res["changed"] is True and not path.exists()
    assert '"Running"' in res["diff"]["before"] and res["diff"]["after"] == ""
    res = run_module("service_json", {"path": str(path), "state": "absent"}, diff=True)
    assert res["_rc"] == 0 and res["changed"] is False


def test_no_diff_unless_asked(run_module, sdir):
    res = run_module("service_json", {"path": str(sdir / "service.json"), "job_status": "Queued"}, diff=False)
    assert res["changed"] is True and "diff" not in res


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": "12a"}, "port"),
        ({"port": "80;id"}, "port"),
        ({"slug": "lab\nx"}, "slug"),
        ({"slug": "$(id)"}, "slug"),
        ({"slug": "`id`"}, "slug"),
        ({"slug": "-rf"}, "slug"),
        ({"slug": "../../etc"}, "slug"),
        ({"slug": "vnc.html?password=s3cret"}, "slug"),
        ({"job_status": "Done"}, "job_status"),
        ({"url": "/other"}, "url"),
        ({"extra": {"JOB_STATUS": "x"}}, "extra"),
        ({"mode": "u+rw"}, "mode"),
        ({"job_status": "Running", "url": None, "port": None}, "url"),
    ],
)
def test_bad_values_fail_naming_the_field_and_leave_the_file(run_module, sdir, bad, field):
    path = sdir / "service.json"
    path.write_text('{\n    "SLUG": "",\n    "JOB_STATUS": "Queued",\n    "ERROR_MESSAGE": ""\n}\n')
    before = path.read_bytes()
    res = run_module("service_json", dict({"path": str(path)}, **bad), diff=True)
    assert res["_rc"] != 0 and res.get("failed") is True
    assert field in res["msg"], res["msg"]
    assert path.read_bytes() == before and listing(sdir) == ["service.json"]


def test_corrupt_file_fails_then_force_rebuilds(run_module, sdir):
    path = sdir / "service.json"
    path.write_text("{half a file")
    res = run_module("service_json", {"path": str(path), "job_status": "Failed", "error_message": "oops"}, diff=True)
    assert res["failed"] is True and "force" in res["msg"] and str(path) in res["msg"]
    assert path.read_text() == "{half a file"
    res = run_module("service_json",
                     {"path": str(path), "job_status": "Failed", "error_message": "oops", "force": True}, diff=True)
    assert res["changed"] is True
    assert json.loads(path.read_text()) == {"SLUG": "", "JOB_STATUS": "Failed", "ERROR_MESSAGE": "oops"}


def test_missing_directory_fails_also_in_check_mode(tmp_path, run_module):
    path = tmp_path / "nope" / "service.json"
    for check in (True, False):
        res = run_module("service_json", {"path": str(path), "job_status": "Queued"}, check=check, diff=True)
        assert res["failed"] is True and "does not exist" in res["msg"]
        res = run_module("service_json", {"path": str(path), "state": "absent"}, check=check, diff=True)
        assert res["_rc"] == 0 and res["changed"] is False  # nothing to remove
    assert not (tmp_path / "nope").exists()


def test_mode_change_alone_is_a_change(run_module, sdir):
    path = sdir / "service.json"
    run_module("service_json", {"path": str(path), "job_status": "Queued"}, diff=True)
    res = run_module("service_json", {"path": str(path), "mode": "0640"}, diff=True)
    assert res["changed"] is True and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert "0600" in res["diff"]["before_header"] and "0640" in res["diff"]["after_header"]
    res = run_module("service_json", {"path": str(path), "mode": "0640"}, diff=True)
    assert res["changed"] is False


def test_extra_keys_and_error_message_escaping(run_module, sdir):
    path = sdir / "service.json"
    res = run_module("service_json", {"path": str(path), "job_status": "Queued", "error_message": "Resources\x1b[0m",
                                      "extra": {"NODE": "compute1", "ATTEMPT": 2}}, diff=True)
    assert res["changed"] is True
    text = path.read_text()
    assert list(json.loads(text)) == ["SLUG", "JOB_STATUS", "ERROR_MESSAGE", "ATTEMPT", "NODE"]
    assert json.loads(text)["ERROR_MESSAGE"] == "Resources\\x1b[0m"
    res = run_module("service_json", {"path": str(path), "extra": {"NODE": None}}, diff=True)
    assert res["changed"] is True and "NODE" not in json.loads(path.read_text())
