"""The watcher's server, in this process: the request loop, its errors, the payload BOOT reads.

``tests/unit/isession/test_remote.py`` runs the same file the way the watcher does (``python3 -c BOOT``, the payload
on standard input, JSON lines); here it is imported like any module_utils, so coverage and a debugger reach it.
"""
from __future__ import annotations

import io
import json

from ansible_collections.hpc.interactive.plugins.module_utils import _remote_server as RS


def serve(lines: list) -> list:
    out = io.StringIO()
    RS.Server().serve(io.BytesIO(b"".join(line.encode() + b"\n" for line in lines)), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_answer_per_line_and_a_bad_line_does_not_end_the_loop(tmp_path):
    (tmp_path / "job.out").write_text("a\nb\n")
    answers = serve(["not json", json.dumps({"op": "nope"}), json.dumps({"op": "tail", "dir": str(tmp_path)})])
    assert answers[0]["error"].startswith("JSONDecodeError") and answers[0]["reachable"] is False
    assert answers[1]["error"] == "ValueError: unknown op 'nope'"
    assert answers[2] == {"files": {"job.out": "a\nb"}}


def test_teardown_with_nothing_held_answers_no_outcomes():
    ans = RS.Server().handle({"op": "teardown", "holding": {"session_id": "s1", "target": "compute",
                                                            "scheduler": "slurm"}, "skip": ["job"]})
    assert ans == {"outcomes": [], "error": ""}


def test_payload_is_this_file_and_what_it_imports():
    head, body = RS.payload().split(b"\n", 1)
    sources = json.loads(body)
    assert int(head) == len(body)
    assert sources["__main__"] == [False, RS.own_source()]
    for rel in RS.SHIPPED:
        name = RS.PKG + "." + rel.replace("/__init__", "").replace("/", ".")
        assert name in sources, name
    assert sources[RS.PKG + "._schedulers"][0] is True  # a package
    # BOOT itself is a few lines that only read the payload and run this file
    assert "exec(compile(S['__main__'][1]" in RS.BOOT and len(RS.BOOT.splitlines()) == 4
