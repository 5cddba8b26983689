"""The directive policy: which free-form options a user may pass, per scheduler, and how the site changes that.

Each case renders a real script (the same call scheduler_submit makes) and, for Slurm, checks the refusal against
how ``sbatch`` itself would read the line: one option per item, short options and unique abbreviations resolved.
"""
from __future__ import annotations

import os

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _directives as D
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._registry import get_backend

ROLE_NAMES = {"queue": "session_partition", "account": "session_account", "walltime": "session_walltime",
              "directives": "session_directives", "memory": "session_memory", "job_name": "", "output": ""}


def render(scheduler, directives, policy=None, **params):
    return D.render_script(get_backend(scheduler), D.normalise_options(params), "true", directives=directives,
                           policy=policy or D.SitePolicy())


def refusal(scheduler, directive, policy=None):
    with pytest.raises(D.DirectiveError) as err:
        render(scheduler, [directive], policy)
    assert err.value.field == "directives"
    return err.value


@pytest.mark.parametrize("scheduler,directive,use", [
    ("slurm", "-A root", "account"), ("slurm", "-Aroot", "account"), ("slurm", "--account=root", "account"),
    ("slurm", "--accou=root", "account"), ("slurm", "--account root", "account"), ("slurm", "-p big", "queue"),
    ("slurm", "--partition=big", "queue"), ("slurm", "-t 99:00:00", "walltime"), ("slurm", "--time=5", "walltime"),
    ("slurm", "-J x", "job_name"), ("slurm", "--job-name=x", "job_name"), ("slurm", "-o /tmp/o", "output"),
    ("slurm", "-e /tmp/e", "error"), ("slurm", "--chdir=/tmp", "workdir"), ("slurm", "-D /tmp", "workdir"),
    ("slurm", "--mem=1G", "memory"), ("slurm", "-c 4", "cpus_per_task"), ("slurm", "-N 2", "nodes"),
    ("slurm", "--qos=high", "qos"), ("slurm", "-C fast", "constraint"), ("slurm", "--gpus=1", "gpus"),
    ("pbs", "-A root", "account"), ("pbs", "-q big", "queue"), ("pbs", "-l walltime=99:00:00", "walltime"),
    ("pbs", "-l mem=1gb,walltime=1:00:00", "memory"), ("pbs", "-N x", "job_name"), ("pbs", "-o /tmp/o", "output"),
    ("pbs", "-e /tmp/e", "error"), ("pbs", "-j oe", "output"), ("pbs", "-l nodes=2:ppn=4", "nodes"),
    ("pbs", "-Aroot", "account"),
    ("sge", "-A root", "account"), ("sge", "-P proj", "account"), ("sge", "-q big.q", "queue"),
    ("sge", "-l h_rt=99:00:00", "walltime"), ("sge", "-l gpu=1,h_rt=1:00:00", "walltime"), ("sge", "-N x", "job_name"),
    ("sge", "-o /tmp/o", "output"), ("sge", "-e /tmp/e", "error"), ("sge", "-cwd", "workdir"),
    ("sge", "-l h_vmem=8G", "memory"),
])
def test_options_of_typed_inputs_are_refused_naming_the_input(scheduler, directive, use):
    err = refusal(scheduler, directive)
    assert err.use == use
    message = err.render(ROLE_NAMES)
    assert message.startswith("session_directives: %r sets " % directive)
    expected = ROLE_NAMES.get(use, use)
    assert message.endswith("; use %s" % expected if expected else "; the session sets it itself")


def test_the_issue_message_in_the_role_words():
    assert refusal("slurm", "-A root").render(ROLE_NAMES) == \
        "session_directives: '-A root' sets the account; use session_account"


@pytest.mark.parametrize("scheduler,directive", [
    ("slurm", "--uid=0"), ("slurm", "--gid=0"), ("slurm", "--uid root"),
    ("pbs", "-u root"), ("pbs", "-W group_list=wheel"), ("pbs", "-P root"),
    ("sge", "-u root"),
])
def test_identity_options_are_refused(scheduler, directive):
    assert "user or group the job runs as" in str(refusal(scheduler, directive))


@pytest.mark.parametrize("scheduler,directive,variable", [
    ("slurm", "--export=ALL,LD_PRELOAD=/tmp/x.so", "LD_PRELOAD"),
    ("slurm", "--export=ALL,LD_LIBRARY_PATH=/tmp", "LD_LIBRARY_PATH"),
    ("slurm", "--export=LD_AUDIT=/tmp/a.so", "LD_AUDIT"),
    ("slurm", "--exp=ALL,PYTHONPATH=/tmp", "PYTHONPATH"),
    ("slurm", "--export ALL,BASH_ENV=/tmp/rc", "BASH_ENV"),
    ("slurm", "--export=ALL,GLIBC_TUNABLES=glibc.malloc.x=1", "GLIBC_TUNABLES"),
    ("slurm", "--export=ALL,ISESSION_SECRET_FILE=/tmp/s", "ISESSION_SECRET_FILE"),
    ("slurm", "--export=ALL,PATH=/tmp/bin", "PATH"),
    ("slurm", "--export=ALL,NODE_OPTIONS=--require=/tmp/x.js", "NODE_OPTIONS"),
    ("pbs", "-v LD_PRELOAD=/tmp/x.so", "LD_PRELOAD"), ("pbs", "-v A=1,PERL5OPT=-d", "PERL5OPT"),
    ("sge", "-v LD_PRELOAD=/tmp/x.so", "LD_PRELOAD"), ("sge", "-v JAVA_TOOL_OPTIONS=-javaagent:x", "JAVA_TOOL_OPTIONS"),
    ("sge", "-v ld_preload=/tmp/x.so", "ld_preload"),
])
def test_loader_variables_are_refused(scheduler, directive, variable):
    assert "exports %s, which changes how programs load" % variable in str(refusal(scheduler, directive))


@pytest.mark.parametrize("scheduler,directive", [
    ("slurm", "--export-file=/tmp/env"), ("slurm", "--get-user-env"), ("pbs", "-V"), ("sge", "-V"),
])
def test_environments_that_cannot_be_checked_are_refused(scheduler, directive):
    assert "imports an environment that cannot be checked" in str(refusal(scheduler, directive))


def test_export_needs_all_and_refuses_secrets():
    assert "must start with ALL" in str(refusal("slurm", "--export=NONE"))
    assert "must start with ALL" in str(refusal("slurm", "--export=FOO=1"))
    assert "looks like a secret" in str(refusal("slurm", "--export=ALL,API_TOKEN=x"))
    out = render("slurm", ["--export=ALL,OMP_NUM_THREADS=4"])
    assert "#SBATCH --export=ALL,OMP_NUM_THREADS=4" in out.text


@pytest.mark.parametrize("scheduler,directive", [
    ("slurm", "--comment=x -A root"), ("slurm", "--comment x -A root"), ("slurm", "--mail-type=END --uid=0"),
    ("slurm", "--exclusive -A root"), ("pbs", "-m abe -A root"), ("sge", "-m e -A root"), ("sge", "-pe smp 4 -A root"),
])
def test_two_options_in_one_item_are_refused(scheduler, directive):
    # sbatch and qsub split a directive line into words: the second option would be read
    assert "one option" in str(refusal(scheduler, directive))


@pytest.mark.parametrize("scheduler,directive", [
    ("slurm", "--wrap=id"), ("slurm", "--array=1-100"), ("slurm", "--requeue"), ("slurm", "--clusters=other"),
    ("slurm", "--hold"), ("slurm", "-v"), ("slurm", "-H -A root"), ("slurm", "--prio=1"), ("pbs", "-I"),
    ("pbs", "-S /bin/sh"),
    ("pbs", "-t 1-10"), ("pbs", "-l epilogue=/tmp/x"), ("sge", "-@ /tmp/opts"), ("sge", "-S /bin/sh"),
    ("sge", "-t 1-10"), ("sge", "-b y"),
])
def test_options_outside_the_allowlist_are_refused(scheduler, directive):
    assert "not an option the site allows" in str(refusal(scheduler, directive))


@pytest.mark.parametrize("scheduler,directives", [
    ("slurm", ["--comment=x", "--mail-type=END", "--nodelist=compute1", "--exclude=compute2", "-w compute1",
               "--gres=gpu:1", "--mem-per-cpu=1G", "--no-requeue", "--reservation=r", "--exclusive", "-n 2"]),
    ("pbs", ["-m abe", "-M a@b.c", "-l pmem=1gb", "-W depend=afterok:1", "-v OMP_NUM_THREADS=4"]),
    ("sge", ["-notify", "-pe smp 4", "-l gpu=1", "-m e", "-v OMP_NUM_THREADS=4", "-hold_jid 12"]),
])
def test_allowed_options_are_rendered(scheduler, directives):
    out = render(scheduler, directives)
    for directive in directives:
        assert "%s %s" % (get_backend(scheduler).prefix, directive) in out.text


def test_the_site_extends_narrows_or_replaces_the_allowlist():
    assert render("slurm", ["--requeue"], D.SitePolicy(allow_directives=["requeue"])).directives == ["--requeue"]
    assert "not an option the site allows" in str(refusal("slurm", "--comment=x",
                                                          D.SitePolicy(deny_directives=["comment"])))
    only = D.SitePolicy(allowed_directives=["comment"])
    assert render("slurm", ["--comment=x"], only).directives == ["--comment=x"]
    err = str(refusal("slurm", "--mail-type=END", only))
    assert "allowed: comment" in err
    assert render("sge", ["-l gpu=2"], D.SitePolicy(deny_directives=["-l mem*"])).directives[-1] == "-l gpu=2"
    assert "not an option" in str(refusal("sge", "-l mem_free=2G", D.SitePolicy(deny_directives=["-l mem*"])))
    # the site cannot open what a typed input or the job's identity owns
    assert refusal("slurm", "-A root", D.SitePolicy(allow_directives=["account"])).use == "account"
    assert "runs as" in str(refusal("slurm", "--uid=0", D.SitePolicy(allowed_directives=["*"])))


def test_enforced_site_values_win_before_the_policy_is_asked():
    policy = D.SitePolicy(enforced_directives=["--account=site", "--comment=site"])
    out = render("slurm", ["-A root", "--comment=mine"], policy, account="mine")
    assert out.directives[-2:] == ["--account=site", "--comment=site"]
    assert set(out.removed) == {"-A root", "--comment=mine", "--account=mine"}
    assert "root" not in out.text and "mine" not in out.text


def test_site_file_keys(tmp_path):
    site = tmp_path / "etc" / "site.yml"
    site.parent.mkdir(mode=0o755)
    site.write_text("schedulers:\n  slurm:\n    allow_directives: [requeue]\n    deny_directives: [mail-*]\n"
                    "  pbs:\n    allowed_directives: ['-m']\n")
    site.chmod(0o644)
    slurm = D.load_site_policy("slurm", str(site), required_uid=os.getuid())
    assert slurm.allow_directives == ["requeue"] and slurm.deny_directives == ["mail-*"]
    assert slurm.allowed_directives is None
    assert D.load_site_policy("pbs", str(site), required_uid=os.getuid()).allowed_directives == ["-m"]
    site.write_text("schedulers:\n  slurm:\n    allow_directives: requeue\n")
    with pytest.raises(D.DirectiveError, match="allow_directives must be a list"):
        D.load_site_policy("slurm", str(site), required_uid=os.getuid())


@pytest.mark.parametrize("scheduler,params,message", [
    ("pbs", {"qos": "high"}, "session_qos: 'high': PBS has no equivalent of this option here; use session_directives"),
    ("sge", {"nodes": 2}, "session_nodes: 2: in Grid Engine this depends on the site's parallel environments"),
    ("sge", {"cpus_per_task": 4}, "session_cpus: 4: in Grid Engine"),
])
def test_typed_options_a_scheduler_lacks_name_the_input(scheduler, params, message):
    with pytest.raises(D.DirectiveError) as err:
        render(scheduler, [], **params)
    names = dict(ROLE_NAMES, qos="session_qos", nodes="session_nodes", cpus_per_task="session_cpus")
    assert err.value.render(names).startswith(message), err.value.render(names)
