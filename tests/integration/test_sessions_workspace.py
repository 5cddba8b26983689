"""Sessions on the workspace target, end to end through hpc.interactive.start_nginx / hpc.interactive.cancel.

As wsuser in the workspace: start -> service.json Running -> the app page with the secret, 401 without ->
cancel -> no listener, no process of the session, reservation released, record and logs kept -> cancel again.
"""
from __future__ import annotations

import stat
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, also under --import-mode=importlib
from sessions_common import (  # noqa: E402
    WS_USER,
    assert_no_secret_in_argv,
    failure_text,
    http_get,
    listening,
    read_json,
    reservations,
    run_playbook,
    session_processes,
    task_results,
    wait_until,
)

pytestmark = pytest.mark.bed


@pytest.fixture
def root(bed):
    return bed.user_tmpdir(WS_USER) / "sessions"


def start(bed, root, sid, **extra):
    return run_playbook(bed, "hpc.interactive.start_nginx",
                        dict(session_id=sid, session_root=str(root), session_start_timeout=30, **extra))


def cancel(bed, root, sid):
    return run_playbook(bed, "hpc.interactive.cancel", dict(session_id=sid, session_root=str(root)))


def test_nginx_on_workspace_start_serve_cancel_twice(bed, root):
    sid = f"nginx-ws-{int(time.time())}"
    t0 = time.monotonic()
    res = start(bed, root, sid)
    took = time.monotonic() - t0
    assert res.rc == 0, failure_text(res)
    sdir = root / sid
    service = read_json(sdir / "service.json")
    port = int(service["PORT"])
    assert service == {"URL": "/me", "PORT": str(port), "SLUG": "", "JOB_STATUS": "Running", "ERROR_MESSAGE": ""}
    state = read_json(sdir / "state.json")
    assert state["step"] == "running" and state["ports"]["workspace"] == port and state["target"] == "workspace"
    assert [h["step"] for h in state["history"]] == ["created", "ports_reserved", "starting", "running"]
    assert stat.S_IMODE(sdir.stat().st_mode) == 0o700
    assert stat.S_IMODE((sdir / "secret").stat().st_mode) == 0o600
    secret = (sdir / "secret").read_text().strip()
    ready = task_results(res, "Wait until the app answers")[0]
    assert ready["status"] == 401 and ready["elapsed"] < 10
    # the secret is in no result, no argv, no file outside the 0600 ones
    assert secret not in res.stdout and secret not in res.stderr
    assert_no_secret_in_argv(secret)
    for path in sdir.rglob("*"):
        if path.is_file() and secret in path.read_text(errors="replace"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    tmp = bed.user_tmpdir(WS_USER)
    url = f"http://127.0.0.1:{port}/me/{port}/"
    code, body = http_get(bed, "workspace", url, f"Authorization: Bearer {secret}", tmp)
    assert code == 200 and f"hpc.interactive nginx session {sid}" in body
    assert http_get(bed, "workspace", url, f"X-Isession-Token: {secret}", tmp)[0] == 200
    assert http_get(bed, "workspace", url, None, tmp)[0] == 401
    assert http_get(bed, "workspace", url, "Authorization: Bearer wrong", tmp)[0] == 401
    assert http_get(bed, "workspace", f"http://127.0.0.1:{port}/other/", f"Authorization: Bearer {secret}",
                    tmp)[0] == 404
    assert reservations(sid) == [port] and session_processes(str(sdir))
    print(f"start took {took:.2f} s")

    t0 = time.monotonic()
    res = cancel(bed, root, sid)
    took = time.monotonic() - t0
    assert res.rc == 0, failure_text(res)
    assert read_json(sdir / "service.json")["JOB_STATUS"] == "Cancelled"
    state = read_json(sdir / "state.json")
    assert state["step"] == "cancelled" and state["cancel_requested"] is True and state["ended"]
    assert wait_until(lambda: not listening(bed, "workspace", port), 5), "port still listening after cancel"
    assert wait_until(lambda: not session_processes(str(sdir)), 5), session_processes(str(sdir))
    assert reservations(sid) == []
    assert (sdir / "logs").is_dir() and (sdir / "secret").is_file()  # record and logs kept
    print(f"cancel took {took:.2f} s")

    again = cancel(bed, root, sid)
    assert again.rc == 0, failure_text(again)
    changed = [t["task"]["name"] for t in again.tasks() for r in t["hosts"].values() if r.get("changed")]
    assert changed == [], changed
    assert read_json(sdir / "service.json")["JOB_STATUS"] == "Cancelled"


def test_start_failure_is_failed_in_words_and_undone(bed, root):
    sid = f"nginx-bad-{int(time.time())}"
    res = start(bed, root, sid, nginx_binary="/nonexistent/nginx")
    assert res.rc != 0
    sdir = root / sid
    service = read_json(sdir / "service.json")
    assert service["JOB_STATUS"] == "Failed"
    assert service["ERROR_MESSAGE"] == "/nonexistent/nginx not found on workspace", service
    state = read_json(sdir / "state.json")
    assert state["step"] == "failed" and state["error"] == service["ERROR_MESSAGE"]
    assert reservations(sid) == []
    assert wait_until(lambda: not session_processes(str(sdir)), 5), session_processes(str(sdir))
    res = cancel(bed, root, sid)  # cancel of a failed session: ok, keeps Failed
    assert res.rc == 0, failure_text(res)
    assert read_json(sdir / "service.json")["JOB_STATUS"] == "Failed"


def test_cancel_before_start_stops_the_start(bed, root):
    sid = f"nginx-race-{int(time.time())}"
    res = cancel(bed, root, sid)  # a cancel that wins the race leaves a tombstone
    assert res.rc == 0, failure_text(res)
    res = start(bed, root, sid)
    assert res.rc != 0
    assert "was cancelled" in failure_text(res)
    assert reservations(sid) == []
    assert read_json(root / sid / "state.json")["step"] == "cancelled"
    assert not session_processes(str(root / sid))


def test_nginx_proxies_an_upstream_without_forwarding_the_secret(bed, root):
    """nginx_upstream: the base path is stripped, the secret headers are not passed on."""
    sid = f"nginx-up-{int(time.time())}"
    www = bed.user_tmpdir(WS_USER)
    bed.write_user_file(WS_USER, www / "marker.html", "upstream marker page\n", mode=0o644)
    up_port = 20000 + int(time.time()) % 5000
    upstream = bed.popen("workspace", ["python3", "-c", ECHO_SERVER, str(up_port), str(www)], user=WS_USER)
    try:
        assert wait_until(lambda: listening(bed, "workspace", up_port), 10)
        res = start(bed, root, sid, nginx_upstream=f"http://127.0.0.1:{up_port}")
        assert res.rc == 0, failure_text(res)
        port = int(read_json(root / sid / "service.json")["PORT"])
        secret = (root / sid / "secret").read_text().strip()
        tmp = bed.user_tmpdir(WS_USER)
        code, body = http_get(bed, "workspace", f"http://127.0.0.1:{port}/me/{port}/marker.html",
                              f"Authorization: Bearer {secret}", tmp)
        assert code == 200 and "path=/marker.html" in body and "upstream marker page" in body
        assert secret not in body and "authorization" not in body.lower()
        assert http_get(bed, "workspace", f"http://127.0.0.1:{port}/me/{port}/marker.html", None, tmp)[0] == 401
    finally:
        cancel(bed, root, sid)
        upstream.kill()
        upstream.wait()


# A tiny upstream: answers with the request path, the request headers and the file's content.
ECHO_SERVER = r"""
import http.server, os, sys
port, root = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = os.path.join(root, self.path.lstrip("/"))
        body = "path=%s\n%s\n" % (self.path, "".join("%s: %s\n" % kv for kv in self.headers.items()))
        if os.path.isfile(path):
            body += open(path).read()
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""
