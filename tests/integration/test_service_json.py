"""service_json end to end.

* 1,000 rewrites: a writer process rewrites service.json through ``_service_file`` while a reader
  process polls it (open + read + json.loads in a tight loop). Runs locally, no bed.
* On the bed: a real ``ansible-playbook`` run as ``wsuser`` on ``workspace``: check mode ->
  real run -> idempotent -> diff -> hostile value refused -> absent -> absent again.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pwd
import stat
import textwrap
import time

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _service_file as sf

REWRITES = 1000
HANDSHAKE_EVERY = 50  # the writer waits for the reader every this many writes, so states are seen
STATUSES = sf.JOB_STATUSES
GUARD_SECONDS = 300  # a deadlock guard only: nothing asserts on how long anything takes


def expected_content(seq: int) -> dict:
    """What write number ``seq`` puts in the file (the reader checks every read against it)."""
    status = STATUSES[seq % len(STATUSES)]
    message = ("x" * (seq % 300) + "\n$(id) `id`; -rf") if status in ("Failed", "Completed") else ""
    return {"URL": "/me", "PORT": str(40000 + seq % 7), "SLUG": "lab" if seq % 2 else "",
            "JOB_STATUS": status, "ERROR_MESSAGE": message, "SEQ": seq}


def _writer(path: str, reads, done, reader_gone, out) -> None:
    changed = 0
    try:
        for seq in range(REWRITES):
            want = expected_content(seq)
            did, _ignored = sf.update_service_file(path, url=want["URL"], port=int(want["PORT"]),
                                                   slug=want["SLUG"], job_status=want["JOB_STATUS"],
                                                   error_message=want["ERROR_MESSAGE"], extra={"SEQ": seq})
            changed += int(did)
            if seq % HANDSHAKE_EVERY == 0:
                # two more completed reads => at least one read began after this write and saw it
                target = reads.value + 2
                deadline = time.monotonic() + GUARD_SECONDS
                while reads.value < target and not reader_gone.is_set():
                    if time.monotonic() > deadline:
                        raise RuntimeError("reader made no progress")
                    time.sleep(0.0005)
        out.put({"changed": changed})
    except BaseException as exc:  # report, never hang the test
        out.put({"error": repr(exc)})
    finally:
        done.set()


def _reader(path: str, reads, events, out) -> None:
    started, done, reader_gone = events
    errors = []
    seen = set()
    last = -1
    count = 0
    started.set()
    while True:
        finished = done.is_set()
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            if last >= 0:
                errors.append("file vanished after seq %d" % last)
        else:
            try:
                data = json.loads(raw)
            except ValueError as exc:
                errors.append("invalid JSON (%s): %r" % (exc, raw[:120]))
            else:
                seq = data.get("SEQ") if isinstance(data, dict) else None
                if not isinstance(seq, int) or data != expected_content(seq):
                    errors.append("unexpected content: %r" % (raw[:200],))
                else:
                    if list(data) != ["URL", "PORT", "SLUG", "JOB_STATUS", "ERROR_MESSAGE", "SEQ"]:
                        errors.append("key order changed at seq %d" % seq)
                    if seq < last:
                        errors.append("went back from seq %d to %d" % (last, seq))
                    last = seq
                    seen.add(seq)
        count += 1
        with reads.get_lock():
            reads.value += 1
        if finished or len(errors) > 20:
            break
    reader_gone.set()
    out.put({"errors": errors, "seen": sorted(seen), "last": last, "reads": count})


def test_reader_never_sees_partial_json_during_1000_rewrites(tmp_path):
    ctx = multiprocessing.get_context("fork")
    path = str(tmp_path / "service.json")
    reads = ctx.Value("l", 0)
    started, done, reader_gone = ctx.Event(), ctx.Event(), ctx.Event()
    wq, rq = ctx.Queue(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(path, reads, (started, done, reader_gone), rq))
    writer = ctx.Process(target=_writer, args=(path, reads, done, reader_gone, wq))
    reader.start()
    assert started.wait(GUARD_SECONDS)
    writer.start()
    try:
        wres = wq.get(timeout=GUARD_SECONDS)
        rres = rq.get(timeout=GUARD_SECONDS)
    finally:
        done.set()
        for proc in (writer, reader):
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert rres["errors"] == [], rres["errors"][:5]
    assert "error" not in wres, wres
    assert wres["changed"] == REWRITES  # every rewrite was a real change
    assert rres["last"] == REWRITES - 1  # the final read saw the last state
    assert len(rres["seen"]) >= REWRITES // HANDSHAKE_EVERY  # many distinct states, not just the last one
    seen_statuses = {STATUSES[s % len(STATUSES)] for s in rres["seen"]}
    assert len(seen_statuses) >= 3, seen_statuses
    assert sorted(os.listdir(tmp_path)) == ["service.json"]  # no temp file left behind
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sf.read_service_file(path) == expected_content(REWRITES - 1)


# ---------------------------------------------------------------------------- on the bed
PLAYBOOK = textwrap.dedent("""\
    - name: service_json on the workspace
      hosts: workspace
      gather_facts: false
      tasks:
        - name: Write service.json
          hpc.interactive.service_json:
            path: "{{ sj_path }}"
            state: "{{ sj_state | default('present') }}"
            url: "{{ sj_url | default(omit) }}"
            port: "{{ sj_port | default(omit) }}"
            slug: "{{ sj_slug | default(omit) }}"
            job_status: "{{ sj_status | default(omit) }}"
            error_message: "{{ sj_message | default(omit) }}"
          register: sj
    """)

TASK = "Write service.json"


@pytest.mark.bed
def test_service_json_through_ansible_playbook_as_wsuser(bed):
    user = "wsuser"
    pw = pwd.getpwnam(user)
    workdir = bed.user_tmpdir(user)
    playbook = bed.write_user_file(user, workdir / "service_json.yml", PLAYBOOK)
    session = workdir / "session"
    session.mkdir(mode=0o700)
    os.chown(session, pw.pw_uid, pw.pw_gid)
    path = session / "service.json"
    present = {"sj_path": str(path), "sj_url": "/me", "sj_port": 56321, "sj_slug": "lab", "sj_status": "Starting"}

    def play(extra, check=False, diff=False):
        out = bed.playbook_json(playbook, host="workspace", user=user, extra_vars=extra, check=check, diff=diff)
        assert "parse_error" not in out, (out.stdout[-2000:], out.stderr[-2000:])
        return out, out.task(TASK, "workspace")

    # check mode: predicts a change, writes nothing
    out, res = play(present, check=True)
    assert out.rc == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert res["changed"] is True
    assert not path.exists()

    # real run
    out, res = play(present)
    assert out.rc == 0 and res["changed"] is True
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == pw.pw_uid
    assert json.loads(path.read_text()) == {"URL": "/me", "PORT": "56321", "SLUG": "lab", "JOB_STATUS": "Starting",
                                            "ERROR_MESSAGE": ""}
    assert res["content"]["PORT"] == "56321"

    # idempotent
    out, res = play(present)
    assert out.rc == 0 and res["changed"] is False
    mtime = os.stat(path).st_mtime_ns

    # diff on a change; keys not given are kept
    out, res = play({"sj_path": str(path), "sj_status": "Running"}, diff=True)
    assert out.rc == 0 and res["changed"] is True
    diff = res["diff"] if isinstance(res["diff"], dict) else res["diff"][0]
    assert '"JOB_STATUS": "Starting"' in diff["before"] and '"JOB_STATUS": "Running"' in diff["after"]
    data = json.loads(path.read_text())
    assert data["JOB_STATUS"] == "Running" and data["SLUG"] == "lab" and data["PORT"] == "56321"
    assert os.stat(path).st_mtime_ns != mtime

    # a hostile value is refused with the field named, file untouched
    before = path.read_bytes()
    out, res = play({"sj_path": str(path), "sj_slug": "lab;$(touch /tmp/pwned)"})
    assert out.rc != 0 and res.get("failed") is True and "slug" in res["msg"]
    assert path.read_bytes() == before
    assert sorted(p.name for p in session.iterdir()) == ["service.json"]

    # absent, then absent again
    out, res = play({"sj_path": str(path), "sj_state": "absent"}, check=True)
    assert out.rc == 0 and res["changed"] is True and path.exists()
    out, res = play({"sj_path": str(path), "sj_state": "absent"})
    assert out.rc == 0 and res["changed"] is True and not path.exists()
    out, res = play({"sj_path": str(path), "sj_state": "absent"})
    assert out.rc == 0 and res["changed"] is False
