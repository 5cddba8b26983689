"""Issue 9 on the bed: another user of the same hosts attacks wsuser's and cluser's sessions, and fails.

The other user is wsuser2 on the workspace and cluser2 on the cluster hosts, running tests/integration/
shared_host_attacker.py as a plain script (as root sees it: real processes of another uid). Each attack is the one
the issue reports; each test asserts that the attacker gets nothing (no request reached its listener, no code ran)
and that the session either is ``Running`` and safe or ended with a message that says what happened:

1. the workspace port bound by another user before the tunnel comes up -> the start fails naming that user, and not
   even the readiness probe went there; after a tunnel drop, with the other user waiting for the port -> the session
   stops saying ``Running`` at the watcher's next tick and ends ``Failed`` naming that user, its job cancelled; a drop
   with nobody waiting -> ``Starting`` with the reason, ``Running`` again once the tunnel is back; the node port bound
   by another user on the compute node before the server -> no tunnel is opened, the session fails in words;
2. a session directory pre-created by another user (and a remote root another user made) -> refused before anything
   is written or submitted; a planted ``argparse.py`` on the job's PYTHONPATH never runs (the helpers run ``-I``);
3. junk ``port-N`` files for the whole default range (and more live-looking claims than one user may hold) -> starting
   works, the session's claim takes the port's next name;
4. a reservation directory another user made -> refused with what an administrator runs;
5. another user holding a lock on ``.lock`` -> a stale claim is still reclaimed (there is no shared lock);
6. nginx with a case-swapped secret or ``BEARER`` -> 401.
"""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cli_support import Cli  # noqa: E402
from sessions_common import (  # noqa: E402
    PORTS_DIR,
    WS_USER,
    cluster_inventory,
    failure_text,
    http_get,
    queue,
    read_json,
    reservations,
    run_playbook,
    session_processes,
    wait_until,
)

pytestmark = pytest.mark.bed
WS_OTHER = "wsuser2"
CLUSTER_USER = "cluser"
CLUSTER_OTHER = "cluser2"
ATTACKER = HERE / "shared_host_attacker.py"


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def new_id(kind: str) -> str:
    return f"sha-{kind}-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"


def attacker_script(bed, user: str) -> Path:
    """A copy of shared_host_attacker.py that ``user`` owns, in a fresh directory of theirs."""
    copy = bed.user_tmpdir(user) / "attacker.py"
    shutil.copy(ATTACKER, copy)
    os.chown(copy, uid(user), uid(user))
    return copy


class Attacker:
    """shared_host_attacker.py run by another user in one host's namespaces; its log says what reached it."""

    def __init__(self, bed, host: str, user: str, *args: str) -> None:
        script = attacker_script(bed, user)
        self.log = script.with_name("attacker.log")
        self.err = script.with_name("attacker.err")
        with open(self.err, "w") as err:
            self.proc = bed.popen(host, ["/usr/bin/python3", "-I", str(script), *args, "--log", str(self.log)],
                                  user=user, stdout=subprocess.DEVNULL, stderr=err)

    def lines(self) -> List[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def bound(self) -> Optional[tuple]:
        """(port, epoch) once it holds a port."""
        for line in self.lines():
            if line.startswith("BOUND "):
                _first, port, at = line.split()
                return int(port), float(at)
        return None

    def requests(self) -> List[str]:
        return [line for line in self.lines() if line.startswith("REQUEST ")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def attackers():
    started: List[Attacker] = []
    yield started
    for attacker in started:
        attacker.stop()


def attack(attackers: List[Attacker], bed, host: str, user: str, *args: str) -> Attacker:
    attacker = Attacker(bed, host, user, *args)
    attackers.append(attacker)
    return attacker


@pytest.fixture
def cli(bed):
    c = Cli(bed, inventory=cluster_inventory(bed))
    yield c
    pid = c.root / ".watcher.pid"
    c.stop_watcher()
    if pid.exists() and pid.read_text().strip().isdigit():
        wait_until(lambda: not Path(f"/proc/{pid.read_text().strip()}").exists(), 10)


def cleanup(bed, cli: Cli, sid: str) -> None:
    """Cancel what the test started (idempotent) and scancel its job as a safety net."""
    if (cli.root / sid / "state.json").exists():
        cli.run("cancel", sid, timeout=120)
        job = (cli.state(sid).get("job_id") or "")
        if job and cli.state(sid).get("scheduler") == "slurm":
            bed.slurm(["scancel", job], user=CLUSTER_USER, check=False)


def start(cli: Cli, sid: str, *extra: str, target: str = "compute"):
    args = ["start", "nginx", "--id", sid, "--target", target]
    if target != "workspace":
        args += ["--resource", "controller"]
    return cli.run(*args, "-e", "session_start_timeout=60", "-e", "session_queue_timeout=60", *extra, timeout=300)


def assert_nothing_reached(attacker: Attacker, secret: str) -> None:
    assert attacker.requests() == [], attacker.requests()
    assert secret not in attacker.log.read_text()


# ---------------------------------------------------------------- 1. the workspace port and the node port


def test_workspace_port_taken_before_the_tunnel_fails_the_start_and_reaches_nobody(bed, cli, attackers):
    grabber = attack(attackers, bed, "workspace", WS_OTHER, "grab", "--dir", str(PORTS_DIR), "--uid",
                     str(uid(WS_USER)))
    sid = new_id("grab")
    try:
        cp = start(cli, sid)
        assert cp.returncode != 0, cp.stdout
        assert grabber.bound(), "the other user never got the port: the attack did not happen"
        port = grabber.bound()[0]
        svc = cli.service(sid)
        assert svc["JOB_STATUS"] == "Failed" and svc["PORT"] == str(port), svc
        assert (f"127.0.0.1 port {port} is held by another user (uid {uid(WS_OTHER)} ({WS_OTHER})), "
                f"not by uid {uid(WS_USER)} ({WS_USER})") in svc["ERROR_MESSAGE"], svc
        assert "not marked running" in svc["ERROR_MESSAGE"]
        assert cli.state(sid)["step"] == "failed"
        assert_nothing_reached(grabber, (cli.root / sid / "secret").read_text().strip())  # not even the probe
        assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 30), queue(bed, f"isession-{sid}")
        assert wait_until(lambda: reservations(sid) == [], 10), reservations(sid)
    finally:
        cleanup(bed, cli, sid)


def tunnel_status(state: dict) -> dict:
    return read_json(Path(state["remote_dir"]) / "tunnel" / "isession.status.json")


def test_tunnel_drop_while_another_user_waits_for_the_port_ends_the_session(bed, cli, attackers):
    sid = new_id("drop")
    try:
        cp = start(cli, sid)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        svc, state = cli.service(sid), cli.state(sid)
        port, secret = int(svc["PORT"]), (cli.root / sid / "secret").read_text().strip()
        assert svc["JOB_STATUS"] == "Running"
        assert wait_until((cli.root / ".watcher.pid").exists, 10)
        waiter = attack(attackers, bed, "workspace", WS_OTHER, "bind", "--port", str(port))
        time.sleep(0.5)
        assert waiter.bound() is None  # the session's tunnel holds the port
        os.kill(tunnel_status(state)["ssh_pid"], signal.SIGKILL)  # the tunnel drops, as on a network failure
        assert wait_until(lambda: waiter.bound() is not None, 10), "the other user never got the port"
        bound_at = waiter.bound()[1]
        # the watcher's next tick: no longer Running, but ended, naming the other user
        assert wait_until(lambda: cli.service(sid)["JOB_STATUS"] == "Failed", 10), (
            cli.service(sid), cli.watcher_log()[-3000:])
        svc = cli.service(sid)
        written = (cli.root / sid / "service.json").stat().st_mtime
        print(f"service.json Failed {written - bound_at:.2f} s after the other user bound port {port}")
        assert written - bound_at < 3.0
        assert "another user took the session's workspace port" in svc["ERROR_MESSAGE"], svc
        assert f"(uid {uid(WS_OTHER)} ({WS_OTHER}))" in svc["ERROR_MESSAGE"]
        assert cli.state(sid)["step"] == "failed"
        # the job is cancelled (its supervisor would otherwise retry for minutes), the reservation released
        assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 30), queue(bed, f"isession-{sid}")
        assert wait_until(lambda: not session_processes(state["remote_dir"]), 30)
        assert wait_until(lambda: reservations(sid) == [], 10), reservations(sid)
        assert_nothing_reached(waiter, secret)
        assert waiter.proc.poll() is None  # the other user's process is not ours to stop
    finally:
        cleanup(bed, cli, sid)


def test_tunnel_drop_with_nobody_waiting_says_so_then_running_again(bed, cli):
    sid = new_id("blip")
    supervisor = None
    try:
        cp = start(cli, sid)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        svc, state = cli.service(sid), cli.state(sid)
        port, secret = int(svc["PORT"]), (cli.root / sid / "secret").read_text().strip()
        status = tunnel_status(state)
        supervisor = status["pid"]
        os.kill(supervisor, signal.SIGSTOP)  # keep the tunnel down long enough to be seen
        os.kill(status["ssh_pid"], signal.SIGKILL)
        assert wait_until(lambda: cli.service(sid)["JOB_STATUS"] == "Starting", 10), cli.watcher_log()[-3000:]
        down = cli.service(sid)
        assert down["ERROR_MESSAGE"] == (f"the tunnel to the session is down: nothing listens on workspace port "
                                         f"{port}; waiting for it to be restored"), down
        assert cli.state(sid)["step"] == "running"
        os.kill(supervisor, signal.SIGCONT)
        supervisor = None
        assert wait_until(lambda: cli.service(sid)["JOB_STATUS"] == "Running", 20), cli.watcher_log()[-3000:]
        assert cli.service(sid)["ERROR_MESSAGE"] == ""
        tmp = bed.user_tmpdir(WS_USER)
        url = f"http://127.0.0.1:{port}/me/{port}/"
        assert http_get(bed, "workspace", url, f"Authorization: Bearer {secret}", tmp)[0] == 200
    finally:
        if supervisor:
            os.kill(supervisor, signal.SIGCONT)
        cleanup(bed, cli, sid)


def test_node_port_taken_before_the_server_opens_no_tunnel(bed, cli, attackers):
    """cluser2 on compute1 binds the node port cluser's job reserved before its server does: the agent sees another
    user's listener, opens no tunnel to it and fails in words."""
    grabber = attack(attackers, bed, "compute1", CLUSTER_OTHER, "grab", "--dir", str(PORTS_DIR), "--uid",
                     str(uid(CLUSTER_USER)))
    sid = new_id("node")
    try:
        cp = start(cli, sid, "-e", 'session_directives=["--nodelist=compute1"]')
        assert cp.returncode != 0, cp.stdout
        assert grabber.bound(), "the other user never got the node port: the attack did not happen"
        port = grabber.bound()[0]
        svc = cli.service(sid)
        assert svc["JOB_STATUS"] == "Failed", svc
        assert svc["ERROR_MESSAGE"].startswith("another user took the server's port on compute1, so no tunnel was "
                                               f"opened: 127.0.0.1 port {port} is held by another user "
                                               f"(uid {uid(CLUSTER_OTHER)} ({CLUSTER_OTHER}))"), svc
        assert_nothing_reached(grabber, (cli.root / sid / "secret").read_text().strip())
        assert wait_until(lambda: queue(bed, f"isession-{sid}") == "", 30)
    finally:
        cleanup(bed, cli, sid)


# ---------------------------------------------------------------- 2. the session directory and isolated Python


def shared_dir(bed) -> Path:
    """A directory every cluster user can write to, sticky and root's, like /tmp or a site's scratch."""
    path = bed.user_tmpdir(None)
    path.chmod(0o1777)
    return path


PLANT = "import os\nopen(os.environ.get('MARK', '{mark}'), 'w').write('planted code ran as %d' % os.getuid())\n"


@pytest.mark.parametrize("made_by_other", ["session_dir", "remote_root"])
def test_a_planted_session_directory_is_refused_before_anything_runs(bed, attackers, made_by_other):
    shared = shared_dir(bed)
    sid = new_id("plant")
    mark = shared / f"mark-{sid}"
    remote_root = shared if made_by_other == "session_dir" else shared / "sessions"
    planted = remote_root / sid
    # cluser2 prepares what cluser's session will use: the session directory itself (0777, with an argparse.py that
    # the agent's `python3 _ports.py` would import first), or the whole remote root too (sticky, but cluser2's)
    if made_by_other == "remote_root":
        bed.run("controller", ["mkdir", "-m", "1777", str(remote_root)], user=CLUSTER_OTHER, check=True)
    bed.run("controller", ["mkdir", "-m", "0777", str(planted)], user=CLUSTER_OTHER, check=True)
    bed.run("controller", ["tee", str(planted / "argparse.py")], input=PLANT.format(mark=mark), user=CLUSTER_OTHER,
            check=True)
    cli = Cli(bed, inventory=cluster_inventory(bed, extra=f"isession_remote_root={remote_root}"))
    try:
        cp = start(cli, sid)
        assert cp.returncode != 0, cp.stdout
        svc = cli.service(sid)
        assert svc["JOB_STATUS"] == "Failed", svc
        owner = f"{CLUSTER_OTHER} (uid {uid(CLUSTER_OTHER)})"
        if made_by_other == "session_dir":
            assert f"workdir: {planted} already exists and belongs to {owner}: another user may have put files " \
                   "(code) in it; refused" in svc["ERROR_MESSAGE"], svc
        else:
            assert f"workdir: {planted}: refused, {remote_root} belongs to {owner}" in svc["ERROR_MESSAGE"], svc
        assert queue(bed, f"isession-{sid}") == ""  # nothing was submitted
        assert sorted(p.name for p in planted.iterdir()) == ["argparse.py"]  # nothing written into it
        assert not mark.exists()
    finally:
        cleanup(bed, cli, sid)
        cli.stop_watcher()


def test_planted_modules_on_the_jobs_pythonpath_never_run(bed, cli):
    """A directory another user controls is on the job's PYTHONPATH (say, a shared software tree): the agent's
    helpers run with python -I, so cluser2's argparse.py there is never imported, and the session runs."""
    shared = shared_dir(bed)
    sid = new_id("pypath")
    mark = shared / f"mark-{sid}"
    evil = shared / "pylib"
    bed.run("controller", ["mkdir", "-m", "0755", str(evil)], user=CLUSTER_OTHER, check=True)
    for name in ("argparse.py", "json.py"):
        bed.run("controller", ["tee", str(evil / name)], input=PLANT.format(mark=mark), user=CLUSTER_OTHER,
                check=True)
    try:
        cp = start(cli, sid, "-e", f'session_setup_commands=["export PYTHONPATH={evil}"]')
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert cli.service(sid)["JOB_STATUS"] == "Running"
        assert not mark.exists(), mark.read_text()
    finally:
        cleanup(bed, cli, sid)


# ---------------------------------------------------------------- 3-5. the reservation directory


def remove_junk(owner_uid: int) -> None:
    for path in PORTS_DIR.iterdir():
        try:
            if path.lstat().st_uid == owner_uid:
                path.unlink()
        except FileNotFoundError:
            continue


def test_junk_claims_for_every_port_block_nobody(bed, cli):
    """wsuser2 fills the default range with empty port-N files (22,768 of them, what blocked everyone) and 300 that
    look alive (more than one user may hold): a session starts anyway, and so does a batch job's reservation."""
    other = uid(WS_OTHER)
    sid = new_id("junk")
    script = bed.collections_path / "ansible_collections/hpc/interactive/plugins/module_utils/_ports.py"
    try:
        junk = attacker_script(bed, WS_OTHER)
        made = bed.run("workspace", ["/usr/bin/python3", "-I", str(junk), "junk", "--dir", str(PORTS_DIR), "--first",
                                     "10000", "--last", "32767", "--live", "300"], user=WS_OTHER, check=True,
                       timeout=120).stdout
        # (other users of the machine may hold a few of those names: the directory is every host's /tmp's)
        theirs = [p for p in PORTS_DIR.iterdir() if p.lstat().st_uid == other]
        assert int(made) > 22768 + 300 - 50 and len(theirs) == int(made)
        cp = start(cli, sid, target="workspace")
        assert cp.returncode == 0, cp.stdout + cp.stderr
        port = int(cli.service(sid)["PORT"])
        assert cli.service(sid)["JOB_STATUS"] == "Running"
        mine = [p for p in PORTS_DIR.glob(f"port-{port}*") if p.lstat().st_uid == uid(WS_USER)]
        assert [p.name for p in mine] in ([f"port-{port}.1"], [f"port-{port}.2"]), mine
        assert oct(mine[0].stat().st_mode & 0o777) == "0o600"
        # a batch job's node port on a compute host, in the same (shared) directory
        res = bed.run("compute1", ["/usr/bin/python3", "-I", str(script), "reserve", "--owner", f"{sid}-node"],
                      user=CLUSTER_USER, check=True, timeout=60)
        node_port = json.loads(res.stdout)["port"]
        assert (PORTS_DIR / f"port-{node_port}").lstat().st_uid == other  # the junk is still there ...
        bed.run("compute1", ["/usr/bin/python3", "-I", str(script), "release", "--owner", f"{sid}-node"],
                user=CLUSTER_USER, check=True, timeout=60)
        # ... and wsuser2 cannot remove wsuser's claim from the sticky root-owned directory
        rm = bed.run("workspace", ["rm", "-f", str(mine[0])], user=WS_OTHER)
        assert rm.returncode != 0 and mine[0].exists()
    finally:
        cleanup(bed, cli, sid)
        remove_junk(other)


def test_another_users_lock_blocks_no_reclaim(bed, attackers):
    """wsuser2 holds an exclusive flock on the directory's .lock (which used to guard every reclaim): wsuser's stale
    claim is reclaimed anyway, and a release is not held up."""
    script = bed.collections_path / "ansible_collections/hpc/interactive/plugins/module_utils/_ports.py"
    old = PORTS_DIR / ".lock"  # older code's shared lock file; wsuser2 makes one if there is none it can open
    if old.exists() and not old.stat().st_mode & 0o004:
        old.unlink()
    lock = attack(attackers, bed, "workspace", WS_OTHER, "hold-lock", "--file", str(old))
    assert wait_until(lambda: any(line.startswith("LOCKED") for line in lock.lines()), 10), lock.err.read_text()
    owner = new_id("lock")
    first = json.loads(bed.run("workspace", ["/usr/bin/python3", "-I", str(script), "reserve", "--owner", owner,
                                             "--lease", "1"], user=WS_USER, check=True).stdout)["port"]
    time.sleep(1.5)  # its lease is over: a stale claim only a reclaim frees
    again = bed.run("workspace", ["/usr/bin/python3", "-I", str(script), "reserve", "--owner", f"{owner}-2",
                                  "--range", str(first)], user=WS_USER)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["ports"] == [first]
    rel = bed.run("workspace", ["/usr/bin/python3", "-I", str(script), "release", "--owner", f"{owner}-2"],
                  user=WS_USER, check=True)
    assert json.loads(rel.stdout)["released"] == [first]
    assert lock.proc.poll() is None  # it held the lock all along
    if old.exists() and old.stat().st_uid == uid(WS_OTHER):
        old.unlink()


def test_a_reservation_directory_another_user_made_is_refused(bed):
    script = bed.collections_path / "ansible_collections/hpc/interactive/plugins/module_utils/_ports.py"
    theirs = Path(f"/tmp/isession-ports-sha-{secrets.token_hex(3)}")
    try:
        bed.run("workspace", ["mkdir", "-m", "1777", str(theirs)], user=WS_OTHER, check=True)
        for path in (theirs, Path(f"{theirs}-missing")):
            res = bed.run("workspace", ["/usr/bin/python3", "-I", str(script), "reserve", "--owner", "x", "--dir",
                                        str(path)], user=WS_USER)
            assert res.returncode == 1, res.stdout
            err = json.loads(res.stderr)
            assert err["field"] == "reservation_dir" and f"install -d -o root -g root -m 1777 {path}" in err["error"]
        assert not list(theirs.iterdir())
        st = PORTS_DIR.lstat()
        assert st.st_uid == 0 and oct(st.st_mode & 0o7777) == "0o1777"  # the real one is root's (bed up, as install)
    finally:
        shutil.rmtree(theirs, ignore_errors=True)


# ---------------------------------------------------------------- 6. the secret, compared exactly


def test_nginx_compares_the_secret_exactly(bed):
    root = bed.user_tmpdir(WS_USER) / "sessions"
    sid = new_id("case")
    common = dict(session_id=sid, session_root=str(root))
    res = run_playbook(bed, "hpc.interactive.start_nginx", dict(common, session_target="workspace"))
    try:
        assert res.rc == 0, failure_text(res)
        port = int(read_json(root / sid / "service.json")["PORT"])
        secret = (root / sid / "secret").read_text().strip()
        url = f"http://127.0.0.1:{port}/me/{port}/"
        tmp = bed.user_tmpdir(WS_USER)
        assert secret.swapcase() != secret
        for header, code in ((f"Authorization: Bearer {secret}", 200), (f"X-Isession-Token: {secret}", 200),
                             (f"Authorization: Bearer {secret.swapcase()}", 401),
                             (f"X-Isession-Token: {secret.swapcase()}", 401),
                             (f"Authorization: BEARER {secret}", 401), (f"Authorization: bearer {secret}", 401),
                             (f"Authorization: Bearer {secret}x", 401), (f"X-Isession-Token: {secret[:-1]}", 401)):
            assert http_get(bed, "workspace", url, header, tmp)[0] == code, header.replace(secret, "<secret>")
    finally:
        run_playbook(bed, "hpc.interactive.cancel", common)
