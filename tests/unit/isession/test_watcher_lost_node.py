"""Clean ends after a lost node, through the one teardown: the agent is asked to stop through its directory, and the
workspace port's reservation is released only once nothing of the user's listens on it any more.

The listener here ignores SIGTERM, like the workspace end of a lost node's ``ssh -R`` that the watcher cannot signal
(the user's sshd session process holds it); the resource side of the teardown goes through the watcher's real query
server run locally (``RemoteServer(local=True)``), the same ``teardown`` request it sends over ssh.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from isession import watcher as w
from isession.remote import RemoteServer
from ansible_collections.hpc.interactive.plugins.module_utils import _cmd, _ports, _service_file, _state, _teardown

STUBBORN = ("import signal,socket,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); s=socket.socket(); "
            "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); open(sys.argv[2], 'w').close(); time.sleep(120)")
NODE_FAIL = {"jobs": {"7": {"state": "failed", "raw_state": "NODE_FAIL", "reason": "NodeDown", "nodes": ["cn1"],
                            "found": True}}, "reachable": True, "error": ""}


class Answers(w.Watcher):
    """Scheduler answers from a list; the resource side through a real, local query server."""

    def __init__(self, root: Path, answers: list, rdir: str) -> None:
        super().__init__(root, None, log=self.say)
        self.answers, self.lines = answers, []
        self.reservation_dir = rdir

    def say(self, line: str) -> None:
        self.lines.append(line)

    def query(self, key, job_ids, inventory):
        return self.answers.pop(0) if self.answers else {"jobs": {}, "reachable": True, "error": ""}

    def server_for(self, resource, inventory):
        if resource not in self.servers:
            self.servers[resource] = RemoteServer({"host": resource}, Path(_cmd.__file__).parent, local=True)
        return self.servers[resource]


def run_ticks(watch: w.Watcher, n: int) -> None:
    for _i in range(n):
        watch.tick()
        for fut in list(watch.busy.values()):
            fut.result(timeout=30)


def test_a_lost_nodes_agent_is_asked_to_stop_and_the_port_waits_for_its_listener(tmp_path):
    rdir = tmp_path / "ports"
    res = _ports.ReservationDir(str(rdir))
    res.ensure()
    port = res.reserve("lost", 1, list(range(22000, 22100)))[0][0]
    remote = tmp_path / "cluster" / "lost"
    remote.mkdir(parents=True, mode=0o700)
    root = tmp_path / "s"
    _state.run_op("create", str(root), "lost", {"service": "nginx", "target": "compute", "resource": "controller",
                                                "scheduler": "slurm", "job_id": "7", "step": "running",
                                                "remote_dir": str(remote), "ports": {"workspace": port}})
    _service_file.update_service_file(str(root / "lost" / "service.json"), url="/me", port=port, slug="",
                                      job_status="Running")
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", STUBBORN, str(port), str(ready)])
    watch = Answers(root, [json.loads(json.dumps(NODE_FAIL))], str(rdir))
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        run_ticks(watch, 1)
        svc = json.loads((root / "lost" / "service.json").read_text())
        assert svc["JOB_STATUS"] == "Failed" and svc["ERROR_MESSAGE"].startswith("node failure on cn1"), svc
        # the agent on the lost node is asked to stop, through its directory on the shared file system
        stop = remote / _teardown.AGENT_STOP
        assert stop.read_text() == "the session ended\n" and stop.stat().st_mode & 0o777 == 0o600
        # the listener ignored SIGTERM: the reservation stays, and the next ticks try again
        assert holder.poll() is None
        assert [r.port for r in res.held("lost")] == [port]
        assert "lost" in watch.lingering
        run_ticks(watch, 2)
        assert [r.port for r in res.held("lost")] == [port]
        holder.kill()
        holder.wait(timeout=5)
        run_ticks(watch, 1)
        assert res.held("lost") == [] and "lost" not in watch.lingering and "lost" not in watch.undone
        assert any(f"lost: the listener on its workspace port is gone: released workspace port {port}" in line
                   for line in watch.lines), watch.lines
        assert stop.read_text() == "the session ended\n"  # asked once, never rewritten
    finally:
        holder.kill()
        watch.close()
