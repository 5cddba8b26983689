"""A failed job: the agent's own explanation (agent.error) wins over the scheduler's generic text.

The remote side is the watcher's real query server run locally (``RemoteServer(local=True)``): the same ``tail``
request it sends over ssh reads agent.error from the session's cluster directory.
"""
from __future__ import annotations

import json
from pathlib import Path

from isession import watcher as w
from isession.remote import RemoteServer
from ansible_collections.hpc.interactive.plugins.module_utils import _cmd, _service_file, _state


def make_session(root: Path, sid: str, **fields) -> Path:
    rec = {"service": "nginx", "target": "compute", "resource": "controller", "scheduler": "slurm",
           "job_id": "42", "step": "running"}
    rec.update({k: v for k, v in fields.items() if v is not None})
    if fields.get("resource", "") is None:
        rec.pop("resource")
    _state.run_op("create", str(root), sid, rec)
    _service_file.update_service_file(str(root / sid / "service.json"), url="/me", port=20000, slug="",
                                      job_status="Running")
    return root / sid


def run_ticks(watch: w.Watcher, n: int) -> None:
    for _i in range(n):
        watch.tick()
        for fut in list(watch.busy.values()):
            fut.result(timeout=30)


def service(root: Path, sid: str) -> dict:
    return json.loads((root / sid / "service.json").read_text())


FAILED = {"jobs": {"42": {"state": "failed", "raw_state": "FAILED", "exit_code": 1, "reason": "NonZeroExitCode",
                          "nodes": ["cn1"], "found": True}}, "reachable": True, "error": ""}
WORDS = "the nginx server exited with status 137 on cn1; see logs/server.log"


class LocalServer(w.Watcher):
    """Scheduler answers from a list; everything else (agent.error) through a real, local query server."""

    def __init__(self, root: Path, answers: list) -> None:
        super().__init__(root, None, log=print)
        self.answers = answers

    def query(self, key, job_ids, inventory):
        return self.answers.pop(0)

    def server_for(self, resource, inventory):
        if resource not in self.servers:
            self.servers[resource] = RemoteServer({"host": resource}, Path(_cmd.__file__).parent,
                                                  local=True)
        return self.servers[resource]


def test_agent_words_win_over_the_schedulers(tmp_path):
    root, remote = tmp_path / "s", tmp_path / "cluster" / "a"
    remote.mkdir(parents=True)
    (remote / "agent.error").write_text(WORDS + "\n")
    make_session(root, "a", remote_dir=str(remote))
    watch = LocalServer(root, [json.loads(json.dumps(FAILED))])
    try:
        run_ticks(watch, 1)
    finally:
        watch.close()
    doc = service(root, "a")
    assert doc["JOB_STATUS"] == "Failed"
    assert doc["ERROR_MESSAGE"] == WORDS + " (job 42: FAILED, exit code 1, NonZeroExitCode)", doc


def test_without_agent_words_the_schedulers_text_stays(tmp_path):
    root, remote = tmp_path / "s", tmp_path / "cluster" / "a"
    remote.mkdir(parents=True)
    make_session(root, "a", remote_dir=str(remote))
    watch = LocalServer(root, [json.loads(json.dumps(FAILED))])
    try:
        run_ticks(watch, 1)
    finally:
        watch.close()
    assert service(root, "a")["ERROR_MESSAGE"] == \
        "the job failed on cn1 (job 42: FAILED, exit code 1, NonZeroExitCode)"


def test_workspace_agent_words_read_locally(tmp_path):
    root = tmp_path / "s"
    sdir = make_session(root, "a", target="workspace", resource=None, scheduler="local")
    (sdir / "agent.error").write_text(WORDS + "\n")
    watch = LocalServer(root, [json.loads(json.dumps(FAILED))])
    run_ticks(watch, 1)
    assert service(root, "a")["ERROR_MESSAGE"].startswith(WORDS + " (job 42: FAILED")
