"""Validation, rendering, site policy (ownership, enforcement, limits)."""
from __future__ import annotations

import os

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _directives as D
from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._registry import get_backend

HOSTILE = ["a\nb", "a;b", "$(id)", "`id`", "-x", "a|b", "a&b", "a>b", " a", "a b"]


@pytest.mark.parametrize("field", ["job_name", "queue", "account", "qos", "reservation"])
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_names_refused_naming_field(field, value):
    with pytest.raises(D.DirectiveError) as err:
        D.normalise_options({field: value})
    assert err.value.field == field and str(err.value).startswith(field + ":")


@pytest.mark.parametrize("field", ["workdir", "output", "error"])
@pytest.mark.parametrize("value", HOSTILE + ["/tmp/-rf", "/tmp/a'b", "/tmp/$HOME"])
def test_hostile_paths_refused(field, value):
    with pytest.raises(D.DirectiveError, match="^" + field):
        D.normalise_options({field: value})


@pytest.mark.parametrize("value", ["--comment=a\n#SBATCH --qos=x", "--comment=$(id)", "--comment=`id`", "--x;y",
                                   " --time=5", "time=5", "--comment=a|b", "--comment=a>b", "--comment='a'",
                                   "--comment=a\x00", "--comment=a\\n"])
def test_hostile_directives_refused(value):
    with pytest.raises(D.DirectiveError, match="^directives"):
        D.render_script(get_backend("slurm"), D.normalise_options({}), "true", directives=[value])


@pytest.mark.parametrize("value,seconds", [(90, 5400), ("90", 5400), ("01:30:00", 5400), ("2-00:00:00", 172800),
                                           ("1-12", 129600), ("100:00:00", 360000)])
def test_walltime(value, seconds):
    assert D.parse_walltime("walltime", value) == seconds


@pytest.mark.parametrize("value", ["1:30", "abc", "01:61:00", "0", "-5", True])
def test_walltime_refused(value):
    with pytest.raises(D.DirectiveError, match="^walltime"):
        D.parse_walltime("walltime", value)


@pytest.mark.parametrize("value,mib", [("4G", 4096), ("512M", 512), ("1024", 1024), ("2GB", 2048), ("1T", 1048576),
                                       ("2048K", 2)])
def test_memory(value, mib):
    assert D.parse_memory("memory", value) == mib


def test_environment_quoted_and_secrets_refused():
    out = D.render_script(get_backend("slurm"), D.normalise_options({}), "echo hi",
                          environment={"A": "x y; $(id)", "B": "it's"})
    assert "export A='x y; $(id)'\n" in out.text and "export B='it'\"'\"'s'\n" in out.text
    for bad in ({"API_TOKEN": "x"}, {"db_password": "x"}, {"MY_SECRET": "x"}, {"1A": "x"}, {"A": "x\ny"}):
        with pytest.raises(D.DirectiveError, match="^environment"):
            D.check_environment("environment", bad)


def test_slurm_render_order_and_shebang():
    opts = D.normalise_options({"job_name": "j1", "workdir": "/w", "queue": "debug", "walltime": "1-00:00:01",
                                "nodes": 1, "cpus_per_task": 2, "memory": "1G", "exclusive": True})
    out = D.render_script(get_backend("slurm"), opts, "#!/bin/sh\necho hi\n", directives=["--comment=user"])
    lines = out.text.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert lines[1:11] == ["#SBATCH --job-name=j1", "#SBATCH --chdir=/w", "#SBATCH --partition=debug",
                           "#SBATCH --time=1-00:00:01", "#SBATCH --nodes=1", "#SBATCH --cpus-per-task=2",
                           "#SBATCH --mem=1024M", "#SBATCH --exclusive", "#SBATCH --comment=user",
                           "# rendered by hpc.interactive.scheduler_submit"]
    assert lines[-1] == "echo hi"


def test_enforced_overrides_typed_freeform_and_abbreviations():
    policy = D.SitePolicy(enforced_directives=["--comment=site", "--time=00:10:00", "--mem=100M"])
    opts = D.normalise_options({"job_name": "j", "walltime": "5"})
    out = D.render_script(get_backend("slurm"), opts, "true",
                          directives=["--comment=mine", "-t 20", "--tim=30", "--mem-per-cpu=5G", "--mail-type=END"],
                          policy=policy)
    assert out.directives[-3:] == ["--comment=site", "--time=00:10:00", "--mem=100M"]
    assert "--mail-type=END" in out.directives
    assert set(out.removed) == {"--comment=mine", "-t 20", "--tim=30", "--mem-per-cpu=5G", "--time=00:05:00"}
    assert "mine" not in out.text and "#SBATCH --comment=site" in out.text


def test_limits_checked_on_effective_directives():
    policy = D.SitePolicy(max_walltime_seconds=3600, allowed_queues=["debug"], max_nodes=1)
    slurm = get_backend("slurm")
    for params, directives, field in (({"walltime": "02:00:00"}, [], "walltime"),
                                      ({}, ["--time=2:00:00"], "directives"), ({}, ["-t 120"], "directives"),
                                      ({"queue": "big"}, [], "queue"), ({}, ["-p debug,big"], "directives"),
                                      ({"nodes": 2}, [], "nodes")):
        with pytest.raises(D.DirectiveError, match="^" + field):
            D.render_script(slurm, D.normalise_options(params), "true", directives=directives, policy=policy)
    ok = D.render_script(slurm, D.normalise_options({"walltime": 60, "queue": "debug"}), "true", policy=policy)
    assert "#SBATCH --time=01:00:00" in ok.text


def test_pbs_render_and_workdir_cd():
    opts = D.normalise_options({"job_name": "p1", "workdir": "/w/x", "walltime": 30, "nodes": 2, "ntasks": 2,
                                "memory": "2G", "queue": "batch"})
    out = D.render_script(get_backend("pbs"), opts, "echo hi")
    assert out.text.splitlines()[1:6] == ["#PBS -N p1", "#PBS -q batch", "#PBS -l walltime=00:30:00",
                                          "#PBS -l nodes=2:ppn=2", "#PBS -l mem=2048mb"]
    assert "cd -- /w/x || exit 1" in out.text
    pro = D.render_script(get_backend("pbs", pbs_flavor="pro"), opts, "true")
    assert "#PBS -l select=2:ncpus=2:mem=2048mb" in pro.text
    enforced = D.render_script(get_backend("pbs"), opts, "true",
                               policy=D.SitePolicy(enforced_directives=["-l walltime=00:10:00", "-q site"]))
    assert "#PBS -l walltime=00:30:00" not in enforced.text and enforced.text.count("#PBS -q") == 1


def _write_site(tmp_path, text, mode=0o644):
    site = tmp_path / "etc" / "site.yml"
    site.parent.mkdir(mode=0o755)
    site.write_text(text)
    site.chmod(mode)
    return str(site)


SITE = "schedulers:\n  slurm:\n    enforced_directives: ['--comment=site']\n    max_walltime: '04:00:00'\n" \
       "    allowed_partitions: [debug]\n"


def test_site_policy_loaded(tmp_path):
    uid = os.getuid()
    path = _write_site(tmp_path, SITE)
    policy = D.load_site_policy("slurm", path, required_uid=uid)
    assert policy.enforced_directives == ["--comment=site"] and policy.max_walltime_seconds == 14400
    assert policy.allowed_queues == ["debug"]
    assert D.load_site_policy("pbs", path, required_uid=uid).enforced_directives == []
    assert D.load_site_policy("slurm", str(tmp_path / "missing.yml"), required_uid=uid).enforced_directives == []


def test_site_policy_untrusted_refused(tmp_path):
    uid = os.getuid()
    path = _write_site(tmp_path, SITE, mode=0o666)
    with pytest.raises(D.DirectiveError, match="^site_file.*not group/world writable"):
        D.load_site_policy("slurm", path, required_uid=uid)
    os.chmod(path, 0o644)
    with pytest.raises(D.DirectiveError, match="^site_file"):
        D.load_site_policy("slurm", path, required_uid=uid + 1)  # owned by someone else


@pytest.mark.parametrize("text,match", [("schedulers:\n  slurm:\n    max_wall: 1\n", "unknown keys"),
                                        ("schedulers:\n  slurm:\n    enforced_directives: ['--x;id']\n", "quote"),
                                        ("- a\n", "mapping"), ("schedulers: {slurm: [1]}\n", "mapping")])
def test_site_policy_bad_content(tmp_path, text, match):
    path = _write_site(tmp_path, text)
    with pytest.raises(D.DirectiveError, match=match):
        D.load_site_policy("slurm", path, required_uid=os.getuid())
