"""The watcher is what a queued start waits on: it keeps a queued job's reason in service.json and its place in the
queue in queue.json (for the start's progress view), asks for the queue's details at most every few seconds, and
ticks faster while a session is queued.

The scheduler's answers come from lists; the records and files are the real ones (``_state``, ``_service_file``).
"""
from __future__ import annotations

import json
from pathlib import Path

from isession import progress
from isession import watcher as w
from ansible_collections.hpc.interactive.plugins.module_utils import _service_file, _state


def queued_session(root: Path, sid: str, reason: str = "Priority") -> None:
    _state.run_op("create", str(root), sid, {"service": "nginx", "target": "compute", "resource": "controller",
                                             "scheduler": "slurm", "job_id": "42", "step": "queued"})
    _service_file.update_service_file(str(root / sid / "service.json"), url="/me", port=20000, slug="",
                                      job_status="Queued", error_message=reason)


def answer(state: str, reason: str = "") -> dict:
    return {"jobs": {"42": {"state": state, "raw_state": state.upper(), "reason": reason, "found": True}},
            "reachable": True, "error": ""}


class Queue(w.Watcher):
    def __init__(self, root: Path, answers: list, details: dict) -> None:
        super().__init__(root, None, log=print)
        self.answers, self.detail_answer, self.detail_asks = answers, details, 0

    def query(self, key, job_ids, inventory):
        return self.answers.pop(0)

    def queue_details(self, key, job_ids, inventory):
        self.detail_asks += 1
        return {j: self.detail_answer[j] for j in job_ids if j in self.detail_answer}


def run_ticks(watch: w.Watcher, n: int) -> None:
    for _i in range(n):
        watch.tick()
        for fut in list(watch.busy.values()):
            fut.result(timeout=30)


def test_a_queued_jobs_reason_and_place_reach_the_files_and_go_when_it_runs(tmp_path):
    root = tmp_path / "s"
    queued_session(root, "q")
    details = {"42": {"queue_position": 2, "queue_pending": 3, "start_time": 1900000000}}
    watch = Queue(root, [answer("queued", "Resources"), answer("queued", "Resources"), answer("running")], details)
    try:
        run_ticks(watch, 1)
        doc = json.loads((root / "q" / "service.json").read_text())
        assert doc["JOB_STATUS"] == "Queued" and doc["ERROR_MESSAGE"] == "Resources", doc  # the new reason
        assert watch.waiting  # a start waits on this watcher: it ticks every WAITING_INTERVAL s
        queue_file = root / "q" / progress.QUEUE_FILE
        assert queue_file.stat().st_mode & 0o777 == 0o600
        info = progress.read_queue_file(queue_file)
        assert info is not None and info.describe(now=1899999800).startswith(
            "queued (job 42): Resources, position 2 of 3, estimated start ")
        run_ticks(watch, 1)
        assert watch.detail_asks == 1  # at most every QUEUE_DETAILS_EVERY s, not every tick
        run_ticks(watch, 1)
        assert json.loads((root / "q" / "service.json").read_text())["JOB_STATUS"] == "Starting"
        assert _state.read_record(str(root / "q" / "state.json"))["step"] == "starting"  # what session_wait waits for
        assert not queue_file.exists()
    finally:
        watch.close()


def test_the_progress_view_reads_the_watchers_queue_while_the_start_waits_on_it(tmp_path):
    path = tmp_path / progress.QUEUE_FILE
    p = progress.Progress(queue_source=lambda: progress.read_queue_file(path))
    first = {"jobs": {"42": {"state": "queued", "reason": "Priority"}}}
    p.line({"event": "runner_on_ok", "event_data": {"task_action": "hpc.interactive.scheduler_job_info",
                                                    "res": first}})
    p.line({"event": "playbook_on_task_start",
            "event_data": {"task_action": "hpc.interactive.session_wait",
                           "task": "Wait until the user's watcher sees the job run"}})
    assert p.current_queue().describe() == "queued (job 42): Priority"  # no file yet: the submit's answer
    path.write_text(json.dumps({"job_id": "42", "reason": "Resources", "queue_position": 1, "queue_pending": 1}))
    assert p.current_queue().describe() == "queued (job 42): Resources, position 1 of 1"
    p.line({"event": "runner_on_ok", "event_data": {"task_action": "hpc.interactive.session_wait",
                                                    "res": {"step": "starting"}}})
    assert p.current_queue() is None
