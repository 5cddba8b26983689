"""The free_port module, run for real: an args file and the module's entry point, as Ansible runs it."""
from __future__ import annotations

import json
import random
import socket
import subprocess
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _ports


def free_range(n: int) -> list:
    """``n`` consecutive ports that bind right now, below the ephemeral range."""
    while True:
        start = random.randrange(20000, 30000 - n)
        ports = list(range(start, start + n))
        if all(_ports.port_bindable(p) for p in ports):
            return ports


@pytest.fixture
def rdir(tmp_path):
    return tmp_path / "ports"


def files(rdir: Path) -> dict:
    return {int(p.name[5:]): json.loads(p.read_text()) for p in rdir.glob("port-*")} if rdir.exists() else {}


def test_present_reserves_then_is_idempotent(run_module, rdir):
    args = {"owner": "sess-1", "count": 3, "reservation_dir": str(rdir)}
    first = run_module("free_port", args)
    assert first["changed"] is True and not first.get("failed")
    assert len(first["ports"]) == 3 and len(set(first["ports"])) == 3 and first["port"] == first["ports"][0]
    assert first["ports"] == sorted(first["ports"]) and first["reservation_dir"] == str(rdir)
    assert all(10000 <= p <= 32767 and not 6000 <= p <= 6099 for p in first["ports"])
    on_disk = files(rdir)
    assert sorted(on_disk) == first["ports"] and {r["owner"] for r in on_disk.values()} == {"sess-1"}
    assert oct(rdir.stat().st_mode & 0o7777) == "0o1777"
    again = run_module("free_port", args)
    assert again["changed"] is False and again["ports"] == first["ports"]
    assert files(rdir) == on_disk  # nothing rewritten, lease not touched


def test_check_mode_predicts_without_creating_anything(run_module, rdir):
    args = {"owner": "sess-2", "count": 2, "reservation_dir": str(rdir)}
    pred = run_module("free_port", args, check=True, diff=True)
    assert pred["changed"] is True and len(pred["ports"]) == 2
    assert pred["diff"] == {"before": {"ports": []}, "after": {"ports": pred["ports"]}}
    assert not rdir.exists()
    real = run_module("free_port", args, diff=True)
    assert real["changed"] is True and real["diff"]["after"]["ports"] == real["ports"]
    again = run_module("free_port", args, check=True, diff=True)
    assert again["changed"] is False and again["ports"] == real["ports"]
    assert again["diff"]["before"] == again["diff"]["after"] == {"ports": real["ports"]}
    assert "diff" not in run_module("free_port", args)


def test_absent_releases_only_that_owner_and_is_idempotent(tmp_path, rdir, run_module):
    mine = run_module("free_port", {"owner": "mine", "count": 2, "reservation_dir": str(rdir)})["ports"]
    theirs = run_module("free_port", {"owner": "theirs", "reservation_dir": str(rdir)})["ports"]
    args = {"owner": "mine", "state": "absent", "reservation_dir": str(rdir)}
    pred = run_module("free_port", args, check=True, diff=True)
    assert pred["changed"] is True and pred["released"] == mine and pred["ports"] == []
    assert pred["diff"] == {"before": {"ports": mine}, "after": {"ports": []}}
    assert sorted(files(rdir)) == sorted(mine + theirs)
    done = run_module("free_port", args)
    assert done["changed"] is True and done["released"] == mine
    assert sorted(files(rdir)) == theirs
    again = run_module("free_port", args)
    assert again["changed"] is False and again["released"] == []
    missing = run_module("free_port", dict(args, reservation_dir=str(tmp_path / "nowhere")))
    assert missing["changed"] is False and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("form", ["string", "list", "dict"])
def test_range_and_exclusions_and_a_real_listener(run_module, rdir, form):
    ports = free_range(6)
    spec = {"string": f"{ports[0]}-{ports[-1]}", "list": [ports[0], ports[-1]],
            "dict": {"start": ports[0], "end": ports[-1]}}[form]
    srv = socket.socket()
    srv.bind(("127.0.0.1", ports[4]))
    srv.listen()
    try:
        args = {"owner": "r1", "count": 3, "port_range": spec, "reservation_dir": str(rdir),
                "exclude": [ports[0], f"{ports[2]}-{ports[2]}"]}
        res = run_module("free_port", args)
        assert res["ports"] == [ports[1], ports[3], ports[5]]  # 0, 2 excluded; 4 has a listener
        over = run_module("free_port", dict(args, owner="r2", count=1))
        assert over.get("failed") and over["msg"].startswith("count: ") and over["field"] == "count"
    finally:
        srv.close()
    assert sorted(files(rdir)) == [ports[1], ports[3], ports[5]]  # the failed call left nothing behind


def test_pid_ties_the_reservation_to_a_process(run_module, rdir):
    port = free_range(1)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        res = run_module("free_port", {"owner": "job", "port_range": port[0], "pid": proc.pid,
                                       "reservation_dir": str(rdir)})
        assert res["ports"] == port and files(rdir)[port[0]]["pid"] == proc.pid
        taken = run_module("free_port", {"owner": "other", "port_range": port[0], "reservation_dir": str(rdir)})
        assert taken.get("failed")
    finally:
        proc.kill()
        proc.wait()
    freed = run_module("free_port", {"owner": "other", "port_range": port[0], "reservation_dir": str(rdir)})
    assert freed["changed"] is True and freed["ports"] == port and files(rdir)[port[0]]["owner"] == "other"


@pytest.mark.parametrize("args, field", [
    ({"owner": "../x"}, "owner"),
    ({"owner": "a\nb"}, "owner"),
    ({"owner": "x;id"}, "owner"),
    ({"owner": "ok", "port_range": "80-90"}, "port_range"),
    ({"owner": "ok", "port_range": "6000-6099", "avoid_ephemeral": False}, "port_range"),
    ({"owner": "ok", "port_range": "20000-$(id)"}, "port_range"),
    ({"owner": "ok", "exclude": ["x"]}, "exclude"),
    ({"owner": "ok", "count": 0}, "count"),
    ({"owner": "ok", "count": 65}, "count"),
    ({"owner": "ok", "lease": 0}, "lease"),
    ({"owner": "ok", "pid": 2 ** 22 + 7}, "pid"),
    ({"owner": "ok", "reservation_dir": "LINK"}, "reservation_dir"),
])
def test_bad_input_fails_naming_the_field(tmp_path, rdir, args, field, run_module):
    (tmp_path / "real").mkdir()
    (tmp_path / "LINK").symlink_to(tmp_path / "real")
    args = dict(args)
    args["reservation_dir"] = str(tmp_path / args["reservation_dir"]) if "reservation_dir" in args else str(rdir)
    for check in (False, True):
        res = run_module("free_port", args, check=check)
        assert res.get("failed") is True and res["msg"].startswith(field + ": ") and res["field"] == field
    assert not rdir.exists() and not list((tmp_path / "real").iterdir())


def test_unknown_state_is_refused_by_the_argument_spec(run_module, rdir):
    res = run_module("free_port", {"owner": "ok", "state": "maybe", "reservation_dir": str(rdir)})
    assert res.get("failed") and "state" in res["msg"]
