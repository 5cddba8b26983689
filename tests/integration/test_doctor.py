"""`isession doctor --service`: the service's binaries where its sessions would run, on the bed as wsuser.

The binaries are the ones the service role's spec names (rendered from the role's defaults and ``-e`` inputs),
checked with ``command -v`` like the agent: on the workspace (here), on the controller (over ssh as cluser) and,
with Slurm, inside a one-task ``srun`` probe step on a compute node. A missing binary is a FAIL line naming it and
the host, in the agent's own words, and a start with the same input fails with the same words. When no probe step
can run (a partition that does not exist, or PBS), compute nodes are reported as NOT checked and the controller's
answer is shown instead.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import Cli  # noqa: E402
from sessions_common import cluster_inventory  # noqa: E402

pytestmark = pytest.mark.bed

NGINX = "/usr/sbin/nginx"  # nginx_binary's default (roles/nginx/defaults/main.yml)


def doctor(cli: Cli, *args: str):
    cp = cli.run("doctor", *args, timeout=180)
    return cp.returncode, cp.stdout, cp.stderr


def lines(out: str, what: str):
    """(level, detail) of every output line about ``what`` (e.g. ``nginx@controller``)."""
    return [(parts[0], parts[2]) for parts in (ln.split(None, 2) for ln in out.splitlines())
            if len(parts) == 3 and parts[1] == what]


def test_present_binaries_pass_on_every_target(bed):
    cli = Cli(bed, inventory=cluster_inventory(bed, "slurm"))
    rc, out, err = doctor(cli, "--resource", "controller", "--service", "nginx")
    assert rc == 0, out + err
    assert lines(out, "nginx@workspace") == [("ok", f"on workspace: {NGINX}")], out
    assert lines(out, "nginx@controller") == [("ok", f"on controller: {NGINX}")], out
    # the probe step ran on a compute node, as a job would
    assert lines(out, "nginx@controller/compute") in ([("ok", f"on compute1: {NGINX}")],
                                                      [("ok", f"on compute2: {NGINX}")]), out
    assert "FAIL" not in out and "NOT checked" not in out


def test_missing_binary_fails_naming_it_and_the_host(bed):
    """A bare ``nginx`` (not on a cluster user's PATH: /usr/sbin is not there) and a path that is not installed."""
    cli = Cli(bed, inventory=cluster_inventory(bed, "slurm"))
    rc, out, err = doctor(cli, "-r", "controller", "--service", "nginx", "-t", "controller", "-e", "nginx_binary=nginx")
    assert rc == 1, out + err
    assert ("FAIL", "nginx not found on controller") in lines(out, "nginx@controller"), out
    assert not lines(out, "nginx@workspace") and not lines(out, "nginx@controller/compute"), out

    rc, out, err = doctor(cli, "-r", "controller", "--service", "nginx", "-t", "compute",
                          "-e", "nginx_binary=/usr/sbin/nginx-not-installed")
    assert rc == 1, out + err
    found = lines(out, "nginx@controller/compute")
    assert len(found) == 1 and found[0][0] == "FAIL", out
    assert re.fullmatch(r"/usr/sbin/nginx-not-installed not found on compute[12]", found[0][1]), out

    # two binaries: only the missing one is named, the other is found on the same host
    rc, out, err = doctor(cli, "--service", "code_server", "-t", "workspace",
                          "-e", "code_server_executable=/opt/hpc-interactive/apps/nope/bin/code-server")
    assert rc == 1, out + err
    assert lines(out, "code_server@workspace") == [
        ("ok", f"on workspace: {NGINX}"),
        ("FAIL", "/opt/hpc-interactive/apps/nope/bin/code-server not found on workspace")], out


def test_doctor_and_the_agent_agree_on_a_missing_binary(bed):
    """The session agent refuses the same input with the same words doctor used."""
    cli = Cli(bed, inventory=cluster_inventory(bed, "slurm"))
    try:
        rc, out, err = doctor(cli, "-r", "controller", "--service", "nginx", "-t", "controller",
                              "-e", "nginx_binary=nginx")
        assert ("FAIL", "nginx not found on controller") in lines(out, "nginx@controller"), out + err
        cp = cli.run("start", "nginx", "--id", "doctor-agent-1", "-t", "controller", "-r", "controller",
                     "-e", "nginx_binary=nginx", "-e", "session_start_timeout=60", timeout=300)
        assert cp.returncode != 0, cp.stdout + cp.stderr
        svc = cli.service("doctor-agent-1")
        assert svc["JOB_STATUS"] == "Failed" and "nginx not found on controller" in svc["ERROR_MESSAGE"], svc
    finally:
        cli.run("cancel", "doctor-agent-1", timeout=120)
        cli.stop_watcher()


@pytest.mark.parametrize("case", ["no-partition", "pbs"])
def test_compute_not_probed_is_said_and_the_controller_answers(bed, case):
    scheduler = "pbs" if case == "pbs" else "slurm"
    cli = Cli(bed, inventory=cluster_inventory(bed, scheduler))
    extra = ["-e", "session_partition=no-such-partition"] if case == "no-partition" else []
    rc, out, err = doctor(cli, "-r", "controller", "--service", "nginx", "-t", "compute", *extra)
    assert rc == 0, out + err
    found = lines(out, "nginx@controller/compute")
    assert found[0][0] == "warn" and "compute nodes NOT checked" in found[0][1], out
    assert "checked on the controller controller instead" in found[0][1], out
    if case == "no-partition":
        assert "srun" in found[0][1] and "partition" in found[0][1].lower(), out
    else:
        assert "no cheap probe job with pbs" in found[0][1], out
    assert found[1:] == [("ok", f"on controller: {NGINX}")], out


def test_doctor_options_need_a_service(bed):
    cli = Cli(bed)
    rc, _out, err = doctor(cli, "-t", "compute")
    assert rc == 2 and "--target and -e go with --service" in err
    rc, out, _err = doctor(cli, "--service", "no_such_service", "-t", "workspace")
    assert rc == 1 and "no service 'no_such_service'" in out
