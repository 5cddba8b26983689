"""The session_teardown module, run for real: an args file and the module's entry point, as Ansible runs it.

The table of kinds and states is proven in ``module_utils/test_teardown.py``; here: the module's inputs, its check
mode, its result and its failure when one kind cannot be undone.
"""
from __future__ import annotations


import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _ports


@pytest.fixture
def reserved(tmp_path):
    rdir = _ports.ReservationDir(str(tmp_path / "ports"))
    rdir.ensure()
    ports, _unused = rdir.reserve("sess-1", 1, _ports.build_candidates())
    return rdir, ports[0]


def test_workspace_side_releases_the_port_check_mode_first(run_module, reserved):
    rdir, port = reserved
    args = {"id": "sess-1", "side": "workspace", "target": "compute", "scheduler": "slurm",
            "workspace_port": port, "reservation_dir": rdir.path}
    would = run_module("session_teardown", args, check=True)
    assert would["changed"] is True and would["undone"] == [f"workspace port {port}"], would
    assert [r.port for r in rdir.held("sess-1")] == [port]  # check mode touched nothing
    done = run_module("session_teardown", args)
    assert done["changed"] is True and done["undone"] == [f"workspace port {port}"] and not done.get("failed")
    assert [o["kind"] for o in done["outcomes"]] == ["listeners", "workspace_port"]  # the job lives on the resource
    assert rdir.held("sess-1") == []
    again = run_module("session_teardown", args)
    assert again["changed"] is False and again["undone"] == []


def test_resource_side_fails_naming_the_kind_it_could_not_undo_and_still_does_the_rest(tmp_path, reserved, run_module):
    rdir, port = reserved
    bindir = tmp_path / "bin"
    bindir.mkdir()
    squeue = bindir / "squeue"
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
    squeue.chmod(0o755)
    res = run_module("session_teardown", {"id": "sess-1", "side": "resource", "target": "controller",
                                          "scheduler": "slurm", "reservation_dir": rdir.path,
                                          "scheduler_path": [str(bindir)], "query_timeout": 5})
    assert res["failed"] is True and res["msg"].startswith("job: scheduler did not answer"), res
    assert res["undone"] == [f"node port {port}"]  # the node ports were released all the same
    assert rdir.held("sess-1") == []


@pytest.mark.parametrize("args, field", [
    ({"id": "x" * 56}, "id"),
    ({"id": "-x"}, "id"),
    ({"id": "ok", "skip": ["nope"]}, "skip"),
    ({"id": "ok", "workspace_port": 70000}, "workspace_port"),
    ({"id": "ok", "scheduler": "slurm", "scheduler_path": ["relative/bin"]}, "scheduler_path"),
])
def test_bad_input_is_refused_naming_the_field_and_nothing_is_done(run_module, reserved, args, field):
    rdir, port = reserved
    res = run_module("session_teardown", dict({"side": "workspace", "reservation_dir": rdir.path}, **args))
    assert res["failed"] is True and res.get("field") == field, res
    assert [r.port for r in rdir.held("sess-1")] == [port]
