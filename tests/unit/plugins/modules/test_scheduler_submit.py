"""scheduler_submit run for real (args file, module entry point) against fake scheduler commands on PATH.

The fakes (tests/unit/fixtures/schedulers/fake_scheduler.py) replay recorded answers and log every call,
so each case asserts the exact conversation: what was submitted, and above all what was *not*.
"""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from ansible_collections.hpc.interactive.plugins.module_utils._schedulers.local import group_members

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "schedulers"
_spec = importlib.util.spec_from_file_location("fake_scheduler", FIXTURES / "fake_scheduler.py")
fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake)
CASES = yaml.safe_load((FIXTURES / "modules" / "scheduler_submit.yml").read_text())
USER = __import__("pwd").getpwuid(os.getuid()).pw_name


@pytest.fixture
def harness(tmp_path, run_module):
    return fake.Harness(tmp_path, run_module, names={"name": "t-%s" % uuid.uuid4().hex[:8], "user": USER})


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_conversation(harness, case):
    harness.plan(case["plan"])
    res = harness.run_module("scheduler_submit", case["args"], check=case.get("check", False))
    calls = harness.calls()
    assert [c["cmd"] for c in calls] == case["calls"], (calls, res)
    expect = fake._subst(case.get("expect", {}), harness.names)
    for key, value in expect.items():
        assert res.get(key) == value, (key, res)
    if not expect.get("failed"):
        assert not res.get("failed"), res
    for text in fake._subst(case.get("msg_contains", []), harness.names):
        assert text in res["msg"], res["msg"]
    for cmd, argv in fake._subst(case.get("argv", {}), harness.names).items():
        assert [c["argv"] for c in calls if c["cmd"] == cmd] == [argv]
    for text in fake._subst(case.get("script_contains", []), harness.names):
        assert text in res["script"], res["script"]
    script = Path(harness.tmp) / "work" / ("%s.sh" % harness.names["name"])
    if "script_written" in case:
        assert script.exists() is case["script_written"]
    submitted = [c for c in calls if c["cmd"] in ("sbatch", "qsub")]
    assert len(submitted) <= 1  # never a second submit, whatever happened
    if submitted:
        # the script on disk, 0700, is what the scheduler got, and it is the script the module returned
        assert submitted[0]["argv"][-1] == str(script) == res["script_path"]
        assert submitted[0]["script"] == script.read_text() == res.get("script", script.read_text())
        assert stat.S_IMODE(script.stat().st_mode) == 0o700


def test_submit_argv_and_rendered_script(harness):
    harness.plan({"squeue": [{"json": []}, {"json": [{"job_id": 5, "state": "PENDING"}]}],
                  "sbatch": [{"stdout": "5;cluster\n"}]})
    args = {"scheduler": "slurm", "job_name": "{name}", "workdir": "{tmp}/work", "script": "#!/bin/sh\necho hi\n",
            "partition": "debug", "cpus_per_task": 2, "memory": "1G", "directives": ["--comment=x"],
            "environment": {"APP_MODE": "a b"}}
    res = harness.run_module("scheduler_submit", args, diff=True)
    assert res["changed"] is True and res["job_id"] == "5", res
    sbatch = [c for c in harness.calls() if c["cmd"] == "sbatch"][0]
    assert sbatch["argv"] == ["sbatch", "--parsable", res["script_path"]]
    lines = sbatch["script"].splitlines()
    assert lines[0] == "#!/bin/sh"
    for line in ("#SBATCH --partition=debug", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=1024M",
                 "#SBATCH --comment=x", "export APP_MODE='a b'", "echo hi"):
        assert line in lines, lines
    assert res["diff"]["before"] == "" and res["diff"]["after"] == sbatch["script"]
    # the squeue lookups asked for this user's jobs of this name
    first = harness.calls()[0]["argv"]
    assert first[:2] == ["squeue", "--json"] and "--name=%s" % harness.names["name"] in first
    assert "--user=%s" % USER in first


HOSTILE = [
    ({"job_name": "x;id"}, "job_name"),
    ({"job_name": "-x"}, "job_name"),
    ({"job_name": "a\nb"}, "job_name"),
    ({"job_name": "$(id)"}, "job_name"),
    ({"directives": ["--comment=$(id)"]}, "directives"),
    ({"directives": ["--comment=a\n#SBATCH -p x"]}, "directives"),
    ({"directives": ["--comment=`id`"]}, "directives"),
    ({"directives": ["-p debug; id"]}, "directives"),
    ({"directives": ["comment=x"]}, "directives"),
    ({"workdir": "/tmp/a\nb"}, "workdir"),
    ({"workdir": "/tmp/-rf"}, "workdir"),
    ({"queue": "debug;id"}, "queue"),
    ({"account": "-A"}, "account"),
    ({"output": "/tmp/$(id)"}, "output"),
    ({"error": "/tmp/a b"}, "error"),
    ({"script_path": "/tmp/x`id`.sh"}, "script_path"),
    ({"walltime": "1h"}, "walltime"),
    ({"memory": "lots"}, "memory"),
    ({"nodes": 0}, "nodes"),
    ({"constraint": "a;b"}, "constraint"),
    ({"environment": {"A": "x\ny"}}, "environment"),
    ({"environment": {"BAD-NAME": "x"}}, "environment"),
    ({"environment": {"JUPYTER_TOKEN": "s3cret"}}, "environment"),
]


@pytest.mark.parametrize("args,field", HOSTILE, ids=["%s-%d" % (f, i) for i, (_a, f) in enumerate(HOSTILE)])
@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_hostile_input_fails_naming_the_field_and_runs_nothing(harness, scheduler, args, field):
    harness.plan({"squeue": [{"json": []}], "sbatch": [{"stdout": "1\n"}], "qsub": [{"stdout": "1\n"}],
                  "qstat": [{"rc": 153}]})
    params = {"scheduler": scheduler, "job_name": "{name}", "workdir": "{tmp}/work", "script": "true\n"}
    params.update(args)
    for check in (True, False):
        res = harness.run_module("scheduler_submit", params, check=check)
        assert res.get("failed") is True and res["msg"].startswith(field + ":"), res
    assert harness.calls() == []
    assert not (Path(harness.tmp) / "work").exists()
    assert "s3cret" not in res["msg"]


def test_argument_spec_refusals(harness):
    res = harness.run_module("scheduler_submit", {"scheduler": "slurm", "script": "true"})
    assert res.get("failed") and "job_name" in res["msg"]
    res = harness.run_module("scheduler_submit", {"scheduler": "slurm", "job_name": "{name}", "script": "true",
                                                  "script_file": "/etc/hostname"})
    assert res.get("failed") and "mutually exclusive" in res["msg"]
    res = harness.run_module("scheduler_submit", {"scheduler": "lsf", "job_name": "{name}", "script": "true"})
    assert res.get("failed") and "scheduler" in res["msg"]
    res = harness.run_module("scheduler_submit", {"scheduler": "slurm", "state": "absent", "job_id": "1;id"})
    assert res.get("failed") and res["msg"].startswith("job_id:")
    assert harness.calls() == []


def test_script_file_and_unreadable_script_file(harness, tmp_path):
    body = tmp_path / "body.sh"
    body.write_text("echo from-file\n")
    harness.plan({"squeue": [{"json": []}]})
    res = harness.run_module("scheduler_submit", {"scheduler": "slurm", "job_name": "{name}", "workdir": "{tmp}/w",
                                                  "script_file": str(body)}, check=True)
    assert res["changed"] is True and "echo from-file" in res["script"]
    res = harness.run_module("scheduler_submit", {"scheduler": "slurm", "job_name": "{name}", "workdir": "{tmp}/w",
                                                  "script_file": str(tmp_path / "missing.sh")})
    assert res.get("failed") and res["msg"].startswith("script_file:")
    assert [c["cmd"] for c in harness.calls()] == ["squeue"]  # the check-mode lookup only


def test_wait_for_running_polls_until_running(harness):
    # the duplicate check's JSON list, then the wait's looks: the fixed-format question about the one job
    harness.plan({"squeue": [{"json": []}, {"text": [{"job_id": 7, "state": "PENDING"}]},
                             {"text": [{"job_id": 7, "state": "PENDING", "reason": "Resources"}]},
                             {"text": [{"job_id": 7, "state": "RUNNING", "nodes": "compute2"}]}],
                  "sbatch": [{"stdout": "7\n"}]})
    res = harness.run_module("scheduler_submit", {"scheduler": "slurm", "job_name": "{name}", "workdir": "{tmp}/w",
                                                  "script": "true", "wait_for": "running", "wait_timeout": 20})
    assert res["changed"] is True and res["state"] == "running" and res["nodes"] == ["compute2"], res
    assert [c["cmd"] for c in harness.calls()] == ["squeue", "sbatch", "squeue", "squeue", "squeue"]
    assert all("--jobs=7" in c["argv"] and "--json" not in c["argv"] for c in harness.calls()[2:])


def test_wait_for_running_fails_when_the_job_ends_first(harness):
    harness.plan({"squeue": [{"json": []}, {"json": [{"job_id": 8, "state": "FAILED", "exit_code": 256}]}],
                  "sbatch": [{"stdout": "8\n"}]})
    res = harness.run_module("scheduler_submit", {"scheduler": "slurm", "job_name": "{name}", "workdir": "{tmp}/w",
                                                  "script": "false", "wait_for": "running", "wait_timeout": 20})
    assert res.get("failed") and res["job_id"] == "8" and res["state"] == "failed", res
    assert "before it was running" in res["msg"]
    assert [c["cmd"] for c in harness.calls()].count("sbatch") == 1


def test_local_lifecycle_through_the_modules(harness):
    """scheduler: local runs no scheduler command at all: a detached process group, cancelled twice fine."""
    args = {"scheduler": "local", "job_name": "{name}", "workdir": "{tmp}/work", "script": "exec sleep 60\n",
            "wait_for": "running", "wait_timeout": 10}
    first = harness.run_module("scheduler_submit", args)
    assert first["changed"] is True and first["state"] == "running", first
    pgid = first["job_id"]
    try:
        again = harness.run_module("scheduler_submit", args)
        assert again["changed"] is False and again["job_id"] == pgid
        info = harness.run_module("scheduler_job_info", {"scheduler": "local", "job_ids": [pgid]})
        assert info["jobs"][pgid]["state"] == "running" and info["jobs"][pgid]["name"] == harness.names["name"]
        pred = harness.run_module("scheduler_submit", {"scheduler": "local", "state": "absent", "job_id": pgid},
                                  check=True)
        assert pred["changed"] is True and group_members(int(pgid))  # check mode killed nothing
        gone = harness.run_module("scheduler_submit", {"scheduler": "local", "state": "absent", "job_id": pgid})
        assert gone["changed"] is True and gone["cancelled"] == [pgid] and group_members(int(pgid)) == []
        info = harness.run_module("scheduler_job_info", {"scheduler": "local", "job_ids": [pgid]})
        assert info["jobs"][pgid]["state"] == "cancelled"
        twice = harness.run_module("scheduler_submit", {"scheduler": "local", "state": "absent", "job_id": pgid})
        assert twice["changed"] is False and not twice.get("failed")
    finally:
        try:
            os.killpg(int(pgid), 9)
        except OSError:
            pass
    assert harness.calls() == []


# ----------------------------------------------------------------------------- secret, directories, workdir
SECRET = "tok-%s" % uuid.uuid4().hex


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def spy_on_sbatch(harness):
    """Put a sbatch on PATH that first records what the job's files look like at the moment of the submit."""
    seen = Path(harness.tmp) / "seen-at-submit"
    job = Path(harness.tmp) / "job"
    sbatch = Path(harness.bin) / "sbatch"
    sbatch.write_text('#!/bin/sh\n'
                      'stat -c "%%n %%a" "%s/work" "%s/bin" "%s/private" "%s/private/token" > "%s" 2>&1\n'
                      'cat "%s/private/token" >> "%s" 2>&1\n'
                      'exec "%s" "%s" sbatch "$@"\n'
                      % (job, job, job, job, seen, job, seen, sys.executable, FIXTURES / "fake_scheduler.py"))
    sbatch.chmod(0o700)
    return seen


SECRET_ARGS = {"scheduler": "slurm", "job_name": "{name}", "workdir": "{tmp}/job/work",
               "script_path": "{tmp}/job/bin/run.sh", "script": "exec ./agent.sh\n", "secret": SECRET,
               "secret_path": "{tmp}/job/private/token"}


def test_secret_written_0600_in_0700_dirs_before_the_submit_and_never_returned(harness):
    seen = spy_on_sbatch(harness)
    harness.plan({"squeue": [{"json": []}, {"json": [{"job_id": 21, "state": "PENDING"}]}],
                  "sbatch": [{"stdout": "21\n"}]})
    res = harness.run_module("scheduler_submit", SECRET_ARGS)
    assert res["changed"] is True and res["job_id"] == "21" and not res.get("failed"), res
    job = Path(harness.tmp) / "job"
    # at the moment sbatch ran: the three directories 0700 and the secret 0600 with its content
    assert seen.read_text().splitlines() == ["%s/work 700" % job, "%s/bin 700" % job, "%s/private 700" % job,
                                             "%s/private/token 600" % job, SECRET]
    assert (job / "private" / "token").read_text() == SECRET and mode(job / "private" / "token") == 0o600
    assert res["workdir"] == str(job / "work") and res["script_path"] == str(job / "bin" / "run.sh")
    # the secret travels nowhere else: not in the result, the script, or any command line
    assert SECRET not in json.dumps(res) and SECRET not in (job / "bin" / "run.sh").read_text()
    assert res["invocation"]["module_args"]["secret"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert all(SECRET not in json.dumps(c["argv"]) and SECRET not in (c["script"] or "") for c in harness.calls())
    assert [c["cmd"] for c in harness.calls()] == ["squeue", "sbatch", "squeue"]


def test_secret_replaces_an_older_file_and_its_mode(harness):
    token = Path(harness.tmp) / "job" / "private" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("old-token")
    token.chmod(0o644)
    harness.plan({"squeue": [{"json": []}, {"json": [{"job_id": 22, "state": "PENDING"}]}],
                  "sbatch": [{"stdout": "22\n"}]})
    res = harness.run_module("scheduler_submit", SECRET_ARGS)
    assert res["changed"] is True, res
    assert token.read_text() == SECRET and mode(token) == 0o600


def test_check_mode_writes_no_directory_secret_or_script(harness):
    harness.plan({"squeue": [{"json": []}]})
    res = harness.run_module("scheduler_submit", SECRET_ARGS, check=True)
    assert res["changed"] is True and not res.get("failed"), res
    assert res["workdir"] == str(Path(harness.tmp) / "job" / "work")
    assert not (Path(harness.tmp) / "job").exists()
    assert SECRET not in json.dumps(res)
    assert [c["cmd"] for c in harness.calls()] == ["squeue"]


def test_nothing_written_while_a_job_of_that_name_is_alive(harness):
    token = Path(harness.tmp) / "job" / "private" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("token-of-the-running-job")
    harness.plan({"squeue": [{"json": [{"job_id": 23, "state": "RUNNING", "nodes": "compute1"}]}]})
    res = harness.run_module("scheduler_submit", SECRET_ARGS)
    assert res["changed"] is False and res["job_id"] == "23" and not res.get("failed"), res
    assert token.read_text() == "token-of-the-running-job"
    assert not (Path(harness.tmp) / "job" / "work").exists() and not (Path(harness.tmp) / "job" / "bin").exists()
    assert [c["cmd"] for c in harness.calls()] == ["squeue"]


@pytest.mark.parametrize("given", ["secret", "secret_path"])
def test_secret_and_secret_path_are_required_together(harness, given):
    args = {k: v for k, v in SECRET_ARGS.items() if k not in ("secret", "secret_path") or k == given}
    res = harness.run_module("scheduler_submit", args)
    assert res.get("failed") is True and res["msg"] == "parameters are required together: secret, secret_path"
    assert SECRET not in json.dumps(res)
    assert harness.calls() == [] and not (Path(harness.tmp) / "job").exists()


def test_a_directory_that_cannot_be_made_fails_before_the_submit(harness):
    blocker = Path(harness.tmp) / "job"
    blocker.write_text("a file where the job directory should be")
    harness.plan({"squeue": [{"json": []}], "sbatch": [{"stdout": "24\n"}]})
    res = harness.run_module("scheduler_submit", SECRET_ARGS)
    assert res.get("failed") is True and res["msg"].startswith("workdir: cannot make the directory %s/work"
                                                               % blocker), res
    assert [c["cmd"] for c in harness.calls()] == ["squeue"]
    assert SECRET not in json.dumps(res)


def test_a_secret_path_that_is_a_directory_fails_before_the_submit(harness):
    (Path(harness.tmp) / "job" / "private" / "token").mkdir(parents=True)
    harness.plan({"squeue": [{"json": []}], "sbatch": [{"stdout": "25\n"}]})
    res = harness.run_module("scheduler_submit", SECRET_ARGS)
    assert res.get("failed") is True and res["msg"].startswith("secret_path: cannot write"), res
    assert [c["cmd"] for c in harness.calls()] == ["squeue"]
    assert not (Path(harness.tmp) / "job" / "bin" / "run.sh").exists()  # the script comes after the secret
    assert SECRET not in json.dumps(res)


def test_output_and_error_are_paths_with_the_home_expanded(harness):
    harness.plan({"squeue": [{"json": []}]})
    args = {"scheduler": "slurm", "job_name": "{name}", "script": "true", "workdir": "~/isession-unit/{name}",
            "output": "~/isession-unit/%j.out", "error": "~/isession-unit/%j.err"}
    res = harness.run_module("scheduler_submit", args, check=True)
    home = os.path.expanduser("~")
    lines = res["script"].splitlines()
    assert "#SBATCH --output=%s/isession-unit/%%j.out" % home in lines, lines
    assert "#SBATCH --error=%s/isession-unit/%%j.err" % home in lines
    assert res["workdir"] == "%s/isession-unit/%s" % (home, harness.names["name"])


def test_return_script_false_submits_the_same_script_without_sending_it_back(harness):
    harness.plan({"squeue": [{"json": []}, {"json": [{"job_id": 6, "state": "RUNNING"}]}],
                  "sbatch": [{"stdout": "6;cluster\n"}]})
    args = {"scheduler": "slurm", "job_name": "{name}", "workdir": "{tmp}/work", "script": "#!/bin/sh\necho hi\n",
            "return_script": False}
    res = harness.run_module("scheduler_submit", args)
    assert res["changed"] is True and res["job_id"] == "6" and "script" not in res, res
    sbatch = [c for c in harness.calls() if c["cmd"] == "sbatch"][0]
    assert "echo hi" in sbatch["script"] and sbatch["script"] == Path(res["script_path"]).read_text()
    # nor in the arguments reported back (ansible-core's `invocation`): its length in its place, the rest as given
    reported = res["invocation"]["module_args"]
    assert "echo hi" not in json.dumps(res) and reported["script"].startswith("(18 characters, not returned"), res
    assert reported["job_name"] == harness.names["name"] and reported["return_script"] is False
    # the diff still shows it
    harness.plan({"squeue": [{"json": []}]})
    res = harness.run_module("scheduler_submit", dict(args, job_name="{name}-2"), check=True, diff=True)
    assert "script" not in res and "echo hi" in res["diff"]["after"], res
    # a failure reports the arguments the same way, and a secret stays hidden as ever
    harness.plan({"squeue": [{"json": []}], "sbatch": [{"rc": 1, "stderr": "sbatch: error: Invalid account\n"}]})
    res = harness.run_module("scheduler_submit", dict(args, job_name="{name}-3", secret="s3cr3t-value",
                                                      secret_path="{tmp}/work/secret"))
    assert res["failed"] and "Invalid account" in res["msg"], res
    assert "echo hi" not in json.dumps(res) and "s3cr3t-value" not in json.dumps(res), res
    assert res["invocation"]["module_args"]["script"].startswith("(18 characters"), res


def test_the_script_comes_back_in_the_invocation_by_default(harness):
    harness.plan({"squeue": [{"json": []}]})
    res = harness.run_module("scheduler_submit", {"scheduler": "slurm", "job_name": "{name}", "script": "echo hi"},
                             check=True)
    assert res["invocation"]["module_args"]["script"] == "echo hi" and "echo hi" in res["script"], res


def test_no_workdir_in_the_result_without_workdir(harness):
    harness.plan({"squeue": [{"json": []}]})
    res = harness.run_module("scheduler_submit", {"scheduler": "slurm", "job_name": "{name}", "script": "true"},
                             check=True)
    assert res["changed"] is True and "workdir" not in res, res


@pytest.mark.parametrize("wait_for,state", [("running", "RUNNING"), ("queued", "PENDING")])
def test_wait_for_has_no_separate_query_before_the_wait(harness, wait_for, state):
    harness.plan({"squeue": [{"json": []}, {"text": [{"job_id": 26, "state": state, "nodes": "compute1"}]}],
                  "sbatch": [{"stdout": "26\n"}]})
    res = harness.run_module("scheduler_submit", {"scheduler": "slurm", "job_name": "{name}", "workdir": "{tmp}/w",
                                                  "script": "true", "wait_for": wait_for, "wait_timeout": 20})
    assert res["changed"] is True and res["job_id"] == "26" and not res.get("failed"), res
    assert [c["cmd"] for c in harness.calls()] == ["squeue", "sbatch", "squeue"]
    assert "--jobs=26" in harness.calls()[2]["argv"]


# ---------------------------------------------------------------- private_workdir: the session's own directory
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
PRIVATE_ARGS = dict(SECRET_ARGS, workdir="{tmp}/sessions/s1", script_path="{tmp}/sessions/s1/agent.sh",
                    secret_path="{tmp}/sessions/s1/secret", private_workdir=True)


def private_run(harness, check=False):
    harness.plan({"squeue": [{"json": []}, {"json": [{"job_id": 31, "state": "PENDING"}]}],
                  "sbatch": [{"stdout": "31\n"}]})
    return harness.run_module("scheduler_submit", PRIVATE_ARGS, check=check)


def assert_refused(harness, res, *words):
    assert res.get("failed") is True and res["msg"].startswith("workdir: "), res
    for word in words:
        assert word in res["msg"], res["msg"]
    assert [c["cmd"] for c in harness.calls()] == ["squeue"]  # looked for a live job; nothing submitted
    assert SECRET not in json.dumps(res)


def test_private_workdir_is_made_exclusively_0700_then_accepted_again(harness):
    res = private_run(harness)
    assert res["changed"] is True and res["job_id"] == "31" and not res.get("failed"), res
    work = Path(harness.tmp) / "sessions" / "s1"
    assert mode(work) == 0o700 and mode(work.parent) == 0o700 and mode(work / "secret") == 0o600
    again = private_run(harness)  # the user's own 0700 directory: the same session's, accepted
    assert again.get("failed") is not True, again


def test_private_workdir_check_mode_makes_nothing(harness):
    res = private_run(harness, check=True)
    assert res["changed"] is True and not res.get("failed") and not (Path(harness.tmp) / "sessions").exists(), res


@pytest.mark.parametrize("mode_, words", [(0o755, "mode 0755 (0700 expected)"), (0o777, "mode 0777")])
def test_private_workdir_refuses_an_existing_directory_others_may_have_filled(harness, mode_, words):
    work = Path(harness.tmp) / "sessions" / "s1"
    work.mkdir(parents=True)
    work.chmod(mode_)
    (work / "argparse.py").write_text("raise SystemExit('planted')\n")
    assert_refused(harness, private_run(harness), words, "refused")
    assert not (work / "secret").exists() and not (work / "agent.sh").exists()


@as_root
def test_private_workdir_refuses_another_users_directory(harness):
    """Another user pre-created the session directory (0700 or not) with code in it: refused before anything."""
    work = Path(harness.tmp) / "sessions" / "s1"
    work.mkdir(parents=True)
    (work / "argparse.py").write_text("raise SystemExit('planted')\n")
    work.chmod(0o700)
    os.chown(work, NOBODY, NOBODY)
    assert_refused(harness, private_run(harness), "belongs to nobody (uid 65534)", "another user")
    assert sorted(p.name for p in work.iterdir()) == ["argparse.py"]


def test_private_workdir_refuses_a_symlink(harness):
    elsewhere = Path(harness.tmp) / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (Path(harness.tmp) / "sessions").mkdir()
    (Path(harness.tmp) / "sessions" / "s1").symlink_to(elsewhere)
    assert_refused(harness, private_run(harness), "is a symlink")
    assert not list(elsewhere.iterdir())


def test_private_workdir_refuses_a_parent_others_can_write_to(harness):
    (Path(harness.tmp) / "sessions").mkdir()
    (Path(harness.tmp) / "sessions").chmod(0o777)
    assert_refused(harness, private_run(harness), "is writable by other users and not sticky")
    assert not (Path(harness.tmp) / "sessions" / "s1").exists()


@as_root
def test_private_workdir_refuses_a_remote_root_another_user_made(harness):
    """A world-writable sticky remote root made by another user: its owner could replace the session directory."""
    shared = Path(harness.tmp) / "sessions"
    shared.mkdir()
    shared.chmod(0o1777)
    os.chown(shared, NOBODY, NOBODY)
    assert_refused(harness, private_run(harness), "belongs to nobody (uid 65534)")
    assert not (shared / "s1").exists()


@as_root
def test_private_workdir_in_roots_sticky_directory_is_fine(harness):
    shared = Path(harness.tmp) / "sessions"
    shared.mkdir()
    shared.chmod(0o1777)
    res = private_run(harness)
    assert not res.get("failed") and mode(shared / "s1") == 0o700, res


def test_private_workdir_needs_workdir(harness):
    args = {k: v for k, v in PRIVATE_ARGS.items() if k not in ("workdir",)}
    harness.plan({"squeue": [{"json": []}]})
    res = harness.run_module("scheduler_submit", args)
    assert res.get("failed") is True and res["msg"] == "private_workdir: needs workdir", res


@pytest.mark.parametrize("args,message", [
    ({"partition": "bad;x"}, "session_partition: 'bad;x' is not allowed"),
    ({"account": "-A"}, "session_account: '-A' is not allowed"),
    ({"directives": ["-A root"]}, "session_directives: '-A root' sets the account; use session_account"),
    ({"directives": ["--export=ALL,LD_PRELOAD=/tmp/x.so"]},
     "session_directives: '--export=ALL,LD_PRELOAD=/tmp/x.so' exports LD_PRELOAD, which changes how programs load"),
    ({"directives": ["-J other"]}, "session_directives: '-J other' sets the job's name; the session sets it itself"),
])
def test_refusals_name_the_callers_inputs_and_nothing_runs(harness, args, message):
    harness.plan({"squeue": [{"json": []}], "sbatch": [{"stdout": "1\n"}]})
    params = {"scheduler": "slurm", "job_name": "{name}", "workdir": "{tmp}/work", "script": "true\n",
              "input_names": {"queue": "session_partition", "account": "session_account",
                              "directives": "session_directives", "job_name": ""}}
    params.update(args)
    res = harness.run_module("scheduler_submit", params)
    assert res.get("failed") is True and res["msg"].startswith(message), res
    assert harness.calls() == []
    assert not (Path(harness.tmp) / "work").exists()
