"""Write a session record and service.json the way the collection's modules do (through _state/_service_file).

    session.py ROOT ID PORT STATUS [MESSAGE] [--url /me] [--service nginx]

Used for sessions whose backend is a test server rather than a started app. ``--raw-status`` writes service.json's
JOB_STATUS without validation, as a corrupt or hostile file would hold it.
"""
import argparse
import json
import os

from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("id")
p.add_argument("port")
p.add_argument("status")
p.add_argument("message", nargs="?", default="")
p.add_argument("--url", default="/me")
p.add_argument("--service", default="nginx")
p.add_argument("--raw-status")
a = p.parse_args()
os.makedirs(a.root, mode=0o700, exist_ok=True)
_state.run_op("create", a.root, a.id, {"service": a.service, "target": "workspace", "url": a.url,
                                       "ports": {"workspace": int(a.port)}})
step = {"Running": "running", "Failed": "failed", "Starting": "starting"}.get(a.status, "starting")
_state.run_op("update", a.root, a.id, {"step": step})
path = os.path.join(a.root, a.id, "service.json")
_service_file.update_service_file(path, url=a.url, port=a.port, slug="", job_status=a.status,
                                  error_message=a.message)
if a.raw_status:
    data = json.loads(open(path).read())
    data["JOB_STATUS"] = a.raw_status
    with open(path, "w") as fh:
        json.dump(data, fh)
