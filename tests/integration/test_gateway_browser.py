"""A person's view of ``isession gateway``: headless Chromium (Debian's) in the bed's workspace host.

It logs in, sees markup in a status or ERROR_MESSAGE shown as text, starts JupyterLab on the bed's Slurm compute
nodes from the start form, waits on the loading page until it opens the app (with a browser notification), sees
JupyterLab's launcher, runs a notebook cell over the kernel WebSocket (through the gateway) and cancels from the
session list. Screenshots land in tests/output/gateway/ (git-ignored) as artifacts.
It also starts a VNC desktop on the compute nodes from the form and sees XFCE through noVNC's WebSocket (the canvas'
colours counted, not an HTTP code).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_support import Cli
from gateway_support import ARTIFACTS, GatewayRun, chown_tree, fake_session, install_tools
from sessions_common import INSTALL_PLAY, cluster_inventory, queue

pytestmark = pytest.mark.slow
JUPYTERLAB = Path("/opt/hpc-interactive/apps/jupyterlab/bin/jupyter-lab")
XSS = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\"><b>bold</b>"


def run_browser(cli: Cli, cfg: dict, name: str, timeout: float = 600) -> dict:
    """Run gateway_tools/browser.py as the user; its screenshots go to tests/output/gateway/<name>/."""
    shots = cli.tmp / "shots"
    shots.mkdir(exist_ok=True)
    cfg = dict(cfg, shots=str(shots))
    path = cli.bed.write_user_file(cli.user, cli.tmp / "browser.json", json.dumps(cfg))
    chown_tree(shots, cli.user)
    cp = cli.bed.run("workspace", [str(cli.bed.venv / "bin" / "python"), str(cli.tmp / "tools" / "browser.py"),
                                   str(path)], user=cli.user, env=cli.env, timeout=timeout)
    dest = ARTIFACTS / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for png in shots.glob("*.png"):
        shutil.copy(png, dest / png.name)
    assert cp.returncode == 0, f"browser failed ({cp.returncode}); screenshots in {dest}\n{cp.stderr[-4000:]}"
    return json.loads(cp.stdout.strip().splitlines()[-1])


def test_browser_logs_in_starts_jupyterlab_on_slurm_runs_a_cell_and_cancels(bed):
    if not JUPYTERLAB.exists():  # the role's install entry point (idempotent), as the other service tests do
        res = bed.playbook_json(INSTALL_PLAY.format(service="jupyterlab"), user="root", timeout=1800)
        assert res.rc == 0, f"install of jupyterlab failed:\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
    assert Path("/usr/bin/chromium").exists(), "chromium is missing: tests/bed/bed install installs it"
    cli = Cli(bed, inventory=cluster_inventory(bed, "slurm"))
    install_tools(cli)
    fake_session(cli, "gw-xss-message", 9601, "Failed", XSS)
    fake_session(cli, "gw-xss-status", 9602, "Failed", raw_status=XSS)
    gw = GatewayRun(cli, 9191).start()
    try:
        seen = run_browser(cli, {"base": gw.base, "secret": gw.secret, "resource": "controller",
                                 "jupyterlab": True, "xss": ["gw-xss-message", "gw-xss-status"]}, "jupyterlab")
    finally:
        gw.stop()
        for sess in cli.json("list", "--live"):  # a failed run leaves no job behind
            cli.run("cancel", sess["id"], timeout=300)
    # markup in ERROR_MESSAGE and in a (corrupt) JOB_STATUS is shown as text and runs nothing
    for sid, page in seen["xss"].items():
        assert page["flag"] is None and page["injected"] == 0, (sid, page)
    assert "<script>window.__xss = 1</script>" in seen["xss"]["gw-xss-message"]["text"]
    assert "<script>" in seen["xss"]["gw-xss-status"]["text"]
    assert seen["xss_list"]["flag"] is None and seen["xss_list"]["injected"] == 0
    # the real session: loading page, app opened with a notification, launcher, a cell over the kernel WebSocket
    sid = seen["sid"]
    assert seen["loading_status"] in ("Submitting", "Queued", "Starting", "Running")
    assert seen["app_url"].startswith(f"{gw.base}/me/{cli.service(sid)['PORT']}/lab")
    assert seen["notes"] == ["Your session is ready"]
    assert seen["steps"] == ["login", "launcher", "cell", "cancelled"], seen
    assert seen["final_status"] == "Cancelled"
    state = cli.state(sid)
    assert state["target"] == "compute" and state["cancel_requested"] is True
    assert cli.service(sid)["JOB_STATUS"] == "Cancelled"
    assert queue(bed, state["job_name"]) == "" or "COMPLETING" in queue(bed, state["job_name"])
    assert not seen["errors"], seen["errors"]
    assert (ARTIFACTS / "jupyterlab" / "07-notebook-cell.png").stat().st_size > 10_000


def test_browser_sees_the_xfce_desktop_through_novnc(bed):
    cli = Cli(bed, inventory=cluster_inventory(bed, "slurm"))
    install_tools(cli)
    gw = GatewayRun(cli, 9192).start()
    try:
        seen = run_browser(cli, {"base": gw.base, "secret": gw.secret, "resource": "controller", "vnc": True}, "vnc")
    finally:
        gw.stop()
    assert seen["steps"] == ["login", "vnc"], seen
    assert seen["vnc_colours"] > 8, f"noVNC's canvas looks blank ({seen['vnc_colours']} colours)"
