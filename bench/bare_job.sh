#!/bin/bash
# The batch job of the bare path (bare_start.sh submits it through stdin): on the compute node, pick a port,
# start JupyterLab with the same settings as the jupyterlab role (token from the 0600 file, base URL
# /me/WSPORT/, no calls out) and keep `ssh -R WSPORT:127.0.0.1:PORT` to the workspace. scancel ends it all.
set -u
cd "$SLURM_SUBMIT_DIR" || exit 1
port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export BARE_PORT="$port" JUPYTER_RUNTIME_DIR="$PWD/runtime"
cat >jupyter_config.py <<'CONFIG'
import os

c = get_config()  # noqa: F821
with open(os.path.join(os.environ["SLURM_SUBMIT_DIR"], "secret"), encoding="utf-8") as fh:
    c.IdentityProvider.token = fh.read().strip()
c.ServerApp.ip = "127.0.0.1"
c.ServerApp.port = int(os.environ["BARE_PORT"])
c.ServerApp.port_retries = 0
c.ServerApp.base_url = "/me/%s/" % os.environ["BARE_WSPORT"]
c.ServerApp.open_browser = False
c.ServerApp.allow_remote_access = True
c.ServerApp.root_dir = os.path.expanduser("~")
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
c.LabApp.extension_manager = "readonly"
CONFIG
"$BARE_JUPYTER" --config=jupyter_config.py >server.log 2>&1 &
ssh -N -o BatchMode=yes -o ExitOnForwardFailure=yes -o ServerAliveInterval=15 \
  -R "127.0.0.1:$BARE_WSPORT:127.0.0.1:$port" "$BARE_WS" >tunnel.log 2>&1 &
wait
