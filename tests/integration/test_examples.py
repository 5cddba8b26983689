"""The files in examples/ are real: they parse, name only inputs the roles take, and start sessions on the bed.

Each example inventory is used as is, except for the values that name a site (host, users, the workstation's
address, where Grid Engine lives), which are replaced by the bed's; the test refuses an example that holds any other
site-specific value it would silently keep. The matching inputs file then starts an nginx session on the bed's
Slurm, PBS or SGE through the collection's start playbook, and the cancel playbook ends it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, also under --import-mode=importlib
from sessions_common import WS_USER, failure_text, read_json, reservations, run_playbook, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SCHEDULERS = ("slurm", "pbs", "sge")
# the host variables that name a site, and what the bed puts there
SITE_KEYS = {"ansible_host", "ansible_user", "isession_workspace_address", "isession_workspace_user",
             "isession_scheduler_path", "isession_scheduler_env"}
sys.path.insert(0, str(REPO / "src"))


def example_host(scheduler: str):
    data = yaml.safe_load((EXAMPLES / "inventories" / f"{scheduler}.yml").read_text())
    (name, hostvars), = data["all"]["children"]["cluster"]["hosts"].items()
    return data, name, hostvars


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_example_inventory_parses_and_describes_a_resource(scheduler):
    out = subprocess.run([str(Path(sys.executable).with_name("ansible-inventory")), "-i",
                          str(EXAMPLES / "inventories" / f"{scheduler}.yml"), "--list"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    inv = json.loads(out.stdout)
    _ignored, name, _ignored = example_host(scheduler)
    assert inv["cluster"]["hosts"] == [name]
    hv = inv["_meta"]["hostvars"][name]
    assert hv["isession_scheduler"] == scheduler
    for key in ("ansible_host", "isession_workspace_address", "isession_workspace_user", "isession_tunnel_via"):
        assert hv.get(key), key


@pytest.mark.parametrize("path", sorted((EXAMPLES / "inputs").glob("*.yml")), ids=lambda p: p.name)
def test_example_inputs_name_only_inputs_the_roles_take(path):
    from isession.config import check_inputs  # noqa: PLC0415
    from isession.describe import describe  # noqa: PLC0415

    inputs = check_inputs(yaml.safe_load(path.read_text()))
    service = path.stem.split("-")[0]
    info = describe(REPO, service)
    known = {row["name"] for key in ("service_inputs", "session_inputs") for row in info[key]}
    assert set(inputs) <= known, set(inputs) - known


def test_example_config_file_is_valid(monkeypatch):
    from isession import config  # noqa: PLC0415

    monkeypatch.setenv("ISESSION_CONFIG", str(EXAMPLES / "isession-config.yml"))
    cfg = config.load_user_config()
    assert cfg.exists and cfg.data["resource"] == "mycluster"
    assert config.start_settings(cfg, "nginx")["target"].value == "workspace"


def bed_inventory(bed, scheduler: str) -> tuple:
    data, name, hostvars = example_host(scheduler)
    assert set(k for k in hostvars if not k.startswith("isession_") or k in SITE_KEYS) <= SITE_KEYS
    hostvars.update(ansible_host=bed.ip("controller"), ansible_user="cluser",
                    isession_workspace_address=bed.ip("workspace"), isession_workspace_user=WS_USER)
    if "isession_scheduler_path" in hostvars:
        hostvars.update(isession_scheduler_path=[str(bed.sge_bin)],
                        isession_scheduler_env={"SGE_ROOT": str(bed.sge_root), "SGE_CELL": bed.sge_cell})
    path = bed.user_tmpdir(WS_USER) / f"{scheduler}.yml"
    bed.write_user_file(WS_USER, path, yaml.safe_dump(data), mode=0o644)
    return path, name


@pytest.mark.bed
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_example_inventory_and_inputs_start_a_session_on_the_bed(bed, scheduler):
    inventory, resource = bed_inventory(bed, scheduler)
    inputs = yaml.safe_load((EXAMPLES / "inputs" / f"nginx-{scheduler}.yml").read_text())
    root = bed.user_tmpdir(WS_USER) / "sessions"
    sid = f"example-{scheduler}-{int(time.time())}"
    common = {"session_id": sid, "session_root": str(root)}
    try:
        res = run_playbook(bed, "hpc.interactive.start_nginx",
                           dict(inputs, **common, session_target="compute", session_resource=resource,
                                session_start_timeout=90, session_queue_timeout=90), inventory=inventory)
        assert res.rc == 0, failure_text(res)
        assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Running"
        assert read_json(root / sid / "state.json")["scheduler"] == scheduler
    finally:
        done = run_playbook(bed, "hpc.interactive.cancel", common, inventory=inventory)
    assert done.rc == 0, failure_text(done)
    assert read_json(root / sid / "service.json")["JOB_STATUS"] == "Cancelled"
    # the job's agent releases its node port (the bed's hosts share /tmp) as it ends, just after the cancel
    assert wait_until(lambda: reservations(sid) == [], 20), reservations(sid)
