"""Unit tests for the port reservation logic (plugins/module_utils/_ports.py)."""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _ports
from ansible_collections.hpc.interactive.plugins.module_utils._ports import (
    Claim,
    Me,
    PortError,
    Reservation,
    ReservationDir,
)

SCRIPT = Path(_ports.__file__).resolve()
ME = Me(uid=os.geteuid(), user="tester", host="hostA", boot_id="boot-1")
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")


def rdir(path, **kw) -> ReservationDir:
    """A ReservationDir for the test user; a non-root user cannot have a missing one made, so it gets a private one."""
    kw.setdefault("me", ME)
    kw.setdefault("bindable", lambda port: True)
    if os.geteuid() != 0 and not os.path.lexists(path) and os.path.isdir(os.path.dirname(path)):
        os.mkdir(path, 0o700)
    return ReservationDir(str(path), **kw)


def record(port=20000, **kw) -> Reservation:
    base = dict(port=port, owner="s1", host="hostA", boot_id="boot-1", created=1000.0, expires=5000.0)
    base.update(kw)
    return Reservation(**base)


def write_record(d: Path, res: Reservation, name: str = "") -> Path:
    """A claim file as _publish writes it: the record, mode 0600, mtime = the lease's end."""
    path = d / (name or f"port-{res.port}")
    path.write_text(res.to_json())
    path.chmod(0o600)
    os.utime(path, (res.expires, res.expires))
    return path


def claims_of(d: Path, port: int):
    """The claim files of ``port`` (``port-N`` and its other names), with their records."""
    return {p.name: json.loads(p.read_text()) for p in d.iterdir() if _ports.claim_port(p.name) == port}


def free_tcp_ports(n: int, lo: int = 20000, hi: int = 30000):
    """``n`` consecutive ports in [lo, hi) that bind right now (outside the ephemeral range)."""
    start = random.randrange(lo, hi - n)
    while not all(_ports.port_bindable(p) for p in range(start, start + n)):
        start = random.randrange(lo, hi - n)
    return list(range(start, start + n))


@pytest.fixture
def shared_dir():
    """A root-owned-like sticky 1777 directory under /tmp, readable by other users."""
    path = Path(tempfile.mkdtemp(prefix="fp-unit-", dir="/tmp"))
    os.chmod(path, 0o755)  # noqa: S103
    d = path / "res"
    yield d
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("value, expected", [
    ("10000-20000", (10000, 20000)),
    (" 10000 - 20000 ", (10000, 20000)),
    ("12345", (12345, 12345)),
    (12345, (12345, 12345)),
    ([20000, 20010], (20000, 20010)),
    ({"start": 1024, "end": 65535}, (1024, 65535)),
    (["20000", "20010"], (20000, 20010)),
])
def test_parse_range_accepts(value, expected):
    assert _ports.parse_range(value) == expected


@pytest.mark.parametrize("value", [
    "80-90", "1000-2000", "20000-10000", "1-2-3", "abc", "", "20000-", "70000", True, None, 3.5,
    [1], [20000, 20001, 20002], {"start": 20000}, {"start": 20000, "end": 20001, "x": 1}, "20000;id",
])
def test_parse_range_refuses_and_names_the_field(value):
    with pytest.raises(PortError) as err:
        _ports.parse_range(value, "port_range")
    assert err.value.field == "port_range" and str(err.value).startswith("port_range: ")


def test_candidates_skip_x11_always():
    ports = _ports.candidate_ports((5990, 6110))
    assert 5999 in ports and 6100 in ports
    assert not any(6000 <= p <= 6099 for p in ports)
    assert len(ports) == 121 - 100


def test_candidates_skip_exclusions_and_ephemeral():
    ports = _ports.candidate_ports((20000, 20020), exclude=[(20001, 20001), (20005, 20009)], ephemeral=(20015, 60999))
    assert ports == [20000, 20002, 20003, 20004, 20010, 20011, 20012, 20013, 20014]


def test_default_candidates_avoid_the_kernels_ephemeral_range(tmp_path):
    eph = tmp_path / "ip_local_port_range"
    eph.write_text("20000\t60999\n")
    ports = _ports.build_candidates(None, ["10000-10009", 10500], ephemeral_file=str(eph))
    assert ports[0] == 10010 and ports[-1] == 19999 and 10500 not in ports
    assert len(ports) == 10000 - 10 - 1
    # the real kernel range is honoured too
    real = _ports.read_ephemeral_range()
    default = _ports.build_candidates()
    assert real is None or not any(real[0] <= p <= real[1] for p in default)
    assert min(default) >= 10000 and max(default) <= 32767


def test_ephemeral_can_be_allowed_but_x11_not(tmp_path):
    eph = tmp_path / "r"
    eph.write_text("32768 60999")
    assert _ports.build_candidates("40000-40001", avoid_ephemeral=False, ephemeral_file=str(eph)) == [40000, 40001]
    with pytest.raises(PortError) as err:
        _ports.build_candidates("40000-40001", ephemeral_file=str(eph))
    assert err.value.field == "port_range" and "ephemeral" in str(err.value)
    with pytest.raises(PortError):
        _ports.build_candidates("6000-6099", avoid_ephemeral=False)


@pytest.mark.parametrize("text, expected", [("32768\t60999\n", (32768, 60999)), ("1 2", (1, 2)),
                                            ("", None), ("5 4", None), ("a b", None), ("1 2 3", None)])
def test_parse_ephemeral(text, expected):
    assert _ports.parse_ephemeral(text) == expected


@pytest.mark.parametrize("owner", ["s1", "abc-DEF_1.2", "0", "a" * 64, "isession-20261125-abcd"])
def test_owner_accepted(owner):
    assert _ports.validate_owner(owner) == owner


@pytest.mark.parametrize("owner", ["../x", "a/b", "a\nb", "a;b", "", "-x", ".x", "_x", "a" * 65, "$(id)", "`id`",
                                   "a b", "x\n", None, 5, "é"])
def test_hostile_owner_refused(owner):
    with pytest.raises(PortError) as err:
        _ports.validate_owner(owner)
    assert err.value.field == "owner"


def test_check_request():
    _ports.check_request("s1", 64, 1, os.getpid())
    for kw, field in [(dict(count=0), "count"), (dict(count=65), "count"), (dict(lease=0), "lease"),
                      (dict(lease=31 * 86400), "lease"), (dict(pid=0), "pid"), (dict(pid=-1), "pid"),
                      (dict(pid=2 ** 22 + 12345), "pid")]:
        args = dict(owner="s1", count=1, lease=60, pid=None)
        args.update(kw)
        with pytest.raises(PortError) as err:
            _ports.check_request(**args)
        assert err.value.field == field


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /tmp rw,nosuid shared:2 - tmpfs tmpfs rw
24 22 0:40 / /home rw,relatime shared:3 - nfs4 srv:/home rw,vers=4.2
25 24 0:41 / /home/my\\040dir rw - ext4 /dev/sdb1 rw
26 22 0:42 / /scratch rw - lustre 10.0.0.1@o2ib:/fs rw
"""


@pytest.mark.parametrize("path, fstype", [("/tmp/isession-ports", "tmpfs"), ("/home/u/x", "nfs4"), ("/home", "nfs4"),
                                          ("/home/my dir/p", "ext4"), ("/homework", "ext4"), ("/var/tmp", "ext4"),
                                          ("/scratch/p", "lustre")])
def test_fs_type_of(path, fstype):
    assert _ports.fs_type_of(path, MOUNTINFO) == fstype


# ---------------------------------------------------------------- records and staleness


def test_record_roundtrip_and_junk():
    res = record(pid=42, pid_start=7)
    assert Reservation.from_json(res.to_json()) == res
    for junk in ["", "{", "[]", '{"port": 1}', json.dumps(dict(json.loads(res.to_json()), extra=1)),
                 json.dumps(dict(json.loads(res.to_json()), port=True)),
                 json.dumps(dict(json.loads(res.to_json()), expires="never")),
                 json.dumps(dict(json.loads(res.to_json()), owner=None))]:
        assert Reservation.from_json(junk) is None


def never_alive(pid, start):
    return False


def always_alive(pid, start):
    return True


@pytest.mark.parametrize("res, now, age, alive, stale", [
    (record(), 4999.0, 0, never_alive, False),                       # within lease, no pid
    (record(), 5000.0, 0, always_alive, True),                       # lease over, even with a live pid
    (record(pid=42), 2000.0, 0, never_alive, True),                  # watched pid gone on this host
    (record(pid=42), 2000.0, 0, always_alive, False),                # watched pid alive
    (record(pid=42, host="hostB"), 2000.0, 0, never_alive, False),   # another host's pid: cannot judge
    (record(host="hostB"), 6000.0, 0, always_alive, True),           # ... but its lease still ends
    (record(boot_id="boot-0"), 2000.0, 0, always_alive, True),       # written before this host rebooted
    (record(boot_id="boot-0", host="hostB"), 2000.0, 0, always_alive, False),
    (record(boot_id=""), 2000.0, 0, always_alive, False),            # unknown boot id: not judged by it
    (None, 2000.0, 5, always_alive, False),                          # unparsable, young: taken
    (None, 2000.0, 61, always_alive, True),                          # unparsable, old: stale
])
def test_staleness_rules(res, now, age, alive, stale):
    assert _ports.is_stale(res, now, ME, age=age, alive=alive) is stale


def test_pid_alive_checks_start_time():
    me = os.getpid()
    start = _ports.pid_start_time(me)
    assert start is not None and _ports.pid_alive(me) and _ports.pid_alive(me, start)
    assert not _ports.pid_alive(me, start + 1)  # same pid number, different process: a reused pid
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    assert not _ports.pid_alive(proc.pid)
    assert not _ports.pid_alive(0) and not _ports.pid_alive(-1)
    assert _ports.pid_alive(1)  # init: alive, whoever owns it


# ---------------------------------------------------------------- the bind test


@pytest.mark.parametrize("addr", ["127.0.0.1", "0.0.0.0"])  # noqa: S104
def test_bind_test_honours_a_real_listener(addr):
    srv = socket.socket()
    srv.bind((addr, 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        assert _ports.port_bindable(port) is False
    finally:
        srv.close()
    assert _ports.port_bindable(port) is True


def test_bind_test_sees_time_wait_as_busy():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _unused = srv.accept()
    conn.close()  # the server side closes first: its end (local port = port) enters TIME_WAIT
    cli.close()
    srv.close()
    assert _ports.port_bindable(port) is False


def test_reserve_skips_a_listening_port(tmp_path):
    ports = free_tcp_ports(3)
    srv = socket.socket()
    srv.bind(("127.0.0.1", ports[1]))
    srv.listen()
    try:
        d = ReservationDir(str(tmp_path / "r"), me=ME)  # real bind test
        got, _unused = d.reserve("s1", 2, ports)
        assert sorted(got) == [ports[0], ports[2]]
        with pytest.raises(PortError):
            d.reserve("s2", 1, ports)
    finally:
        srv.close()


# ---------------------------------------------------------------- the directory


@as_root
def test_root_creates_the_directory_root_owned_sticky_and_claims_are_private(tmp_path):
    d = rdir(tmp_path / "r")
    got, new = d.reserve("s1", 3, list(range(20000, 20010)), lease=120, pid=os.getpid())
    assert got == new and len(got) == 3 and len(set(got)) == 3
    st = os.lstat(tmp_path / "r")
    assert stat.S_IMODE(st.st_mode) == 0o1777 and st.st_uid == 0
    for port in got:
        f = tmp_path / "r" / f"port-{port}"
        fst = f.stat()
        assert stat.S_IMODE(fst.st_mode) == 0o600 and fst.st_nlink == 1  # the record is its owner's only
        data = json.loads(f.read_text())
        # no more than the owner needs: no user name, no uid (the file's owner says it), no creator pid
        assert set(data) == {"port", "owner", "host", "boot_id", "created", "expires", "pid", "pid_start"}
        assert data["owner"] == "s1" and data["host"] == "hostA" and data["pid"] == os.getpid()
        assert data["port"] == port and data["pid_start"] == _ports.pid_start_time(os.getpid())
        assert data["expires"] - data["created"] == 120
        assert fst.st_mtime == data["expires"]  # what other users judge the lease by
    assert not [n for n in os.listdir(tmp_path / "r") if n.startswith(".tmp")]


def test_refuses_symlink_foreign_nonsticky_relative_and_network_dirs(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PortError, match="symlink") as err:
        rdir(tmp_path / "link").reserve("s1", 1, [20000])
    assert err.value.field == "reservation_dir"
    with pytest.raises(PortError):
        rdir("relative/dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PortError, match="not a directory"):
        rdir(tmp_path / "file").reserve("s1", 1, [20000])
    os.chmod(real, 0o700)
    rdir(real).validate()  # ours, private: fine
    mi = tmp_path / "mountinfo"
    mi.write_text(f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n24 22 0:40 / {tmp_path} rw - nfs srv:/x rw\n")
    with pytest.raises(PortError, match="network file system"):
        rdir(real, mountinfo_file=str(mi)).reserve("s1", 1, [20000])
    assert not list(real.iterdir())


def test_idempotent_present_and_growing_count(tmp_path):
    d = rdir(tmp_path / "r")
    first, new = d.reserve("s1", 2, list(range(20000, 20100)))
    assert new == first
    again, new = d.reserve("s1", 2, list(range(20000, 20100)))
    assert again == first and new == []
    fewer, new = d.reserve("s1", 1, list(range(20000, 20100)))
    assert fewer == first[:1] and new == []
    more, new = d.reserve("s1", 4, list(range(20000, 20100)))
    assert set(first) <= set(more) and len(more) == 4 and sorted(new) == sorted(set(more) - set(first))


def test_held_ports_outside_a_new_range_do_not_count(tmp_path):
    d = rdir(tmp_path / "r")
    old, _unused = d.reserve("s1", 1, [20000, 20001])
    new_ports, new = d.reserve("s1", 1, [21000, 21001])
    assert new == new_ports and new_ports[0] in (21000, 21001)
    assert d.reserve("s1", 1, [20000, 20001, 20002]) == (old, [])
    assert sorted(d.release("s1")) == sorted(old + new_ports)


def test_idempotence_is_per_host_and_per_uid(tmp_path):
    cands = list(range(20000, 20100))
    a = rdir(tmp_path / "r")
    ports_a, _unused = a.reserve("s1", 1, cands)
    b = rdir(tmp_path / "r", me=Me(uid=ME.uid, user="tester", host="hostB", boot_id="boot-9"))
    ports_b, new_b = b.reserve("s1", 1, cands)
    assert new_b == ports_b and ports_b != ports_a  # another host's reservation is not "held" here
    assert b.release("s1") == ports_b and a.held("s1")[0].port == ports_a[0]


def test_absent_releases_only_that_owner_and_is_idempotent(tmp_path):
    d = rdir(tmp_path / "r")
    mine, _unused = d.reserve("s1", 3, list(range(20000, 20100)))
    theirs, _unused = d.reserve("s2", 2, list(range(20000, 20100)))
    assert d.release("s1", dry_run=True) == mine
    assert len(d.ports_on_disk()) == 5
    assert d.release("s1") == mine
    assert d.ports_on_disk() == sorted(theirs)
    assert d.release("s1") == []
    assert rdir(tmp_path / "missing").release("s1") == []
    assert not (tmp_path / "missing").exists()


def test_not_enough_ports_fails_and_leaves_nothing(tmp_path):
    d = rdir(tmp_path / "r")
    d.reserve("other", 1, [20001])
    with pytest.raises(PortError) as err:
        d.reserve("s1", 3, [20000, 20001, 20002])
    assert err.value.field == "count" and "2 of 3" in str(err.value)
    assert d.ports_on_disk() == [20001]


def test_predict_touches_nothing(tmp_path):
    target = tmp_path / "r"
    d = rdir(target)
    ports, new = d.predict("s1", 2, [20000, 20001, 20002])
    assert len(ports) == 2 and new == ports and not target.exists()
    d.reserve("s0", 1, [20000])
    stale = write_record(target, record(port=20001, owner="old", expires=1.0))
    before = sorted(os.listdir(target))
    ports, new = d.predict("s1", 2, [20000, 20001, 20002])
    assert ports == [20001, 20002]  # the stale one would be reclaimed
    assert sorted(os.listdir(target)) == before and stale.exists()
    d.reserve("s1", 2, [20000, 20001, 20002])
    assert d.predict("s1", 2, [20000, 20001, 20002]) == ([20001, 20002], [])


# ---------------------------------------------------------------- staleness and reclaim


def test_expired_own_reservation_is_reclaimed(tmp_path):
    now = [10_000.0]
    d = rdir(tmp_path / "r", clock=lambda: now[0])
    d.reserve("old", 1, [20000], lease=60)
    with pytest.raises(PortError):
        d.reserve("new", 1, [20000])
    now[0] += 61
    assert d.reserve("new", 1, [20000])[0] == [20000]
    assert json.loads((tmp_path / "r" / "port-20000").read_text())["owner"] == "new"
    assert d.held("old") == []


def test_reservation_dies_with_its_pid(tmp_path):
    proc = subprocess.Popen(["sleep", "30"])
    try:
        d = ReservationDir(str(tmp_path / "r"), me=ME, bindable=lambda p: True)  # real pid checks
        d.reserve("job", 1, [20000], pid=proc.pid)
        assert d.held("job")[0].pid == proc.pid
        with pytest.raises(PortError):
            d.reserve("other", 1, [20000])
    finally:
        proc.kill()
        proc.wait()
    assert d.held("job") == []
    assert d.reserve("other", 1, [20000])[0] == [20000]


def test_sweep_removes_own_stale_files_and_old_temp_files(tmp_path):
    d = rdir(tmp_path / "r")
    d.ensure()
    write_record(tmp_path / "r", record(port=20005, expires=1.0))
    left = tmp_path / "r" / f".tmp.{os.getpid()}.{'1' * 16}"
    left.write_text("x")
    d.reserve("s1", 1, [20000])
    assert not (tmp_path / "r" / "port-20005").exists()
    assert left.exists()  # young: it may be a publish in progress
    later = rdir(tmp_path / "r", clock=lambda: time.time() + _ports.TMP_MAX_AGE + 5)
    later.reserve("s2", 1, [20001])
    assert not left.exists()


def test_unparsable_and_lying_files(tmp_path):
    now = [time.time()]
    d = rdir(tmp_path / "r", clock=lambda: now[0])
    d.ensure()
    junk = tmp_path / "r" / "port-20000"
    junk.write_text("garbage")
    write_record(tmp_path / "r", record(port=20002, expires=now[0] + 999))  # claims 20002 ...
    os.rename(tmp_path / "r" / "port-20002", tmp_path / "r" / "port-20001")  # ... but sits in port-20001
    with pytest.raises(PortError):
        d.reserve("s1", 1, [20000, 20001])  # both young junk: taken
    now[0] += 120
    assert sorted(d.reserve("s1", 2, [20000, 20001])[0]) == [20000, 20001]


def test_a_lock_held_on_any_file_in_the_directory_changes_nothing(tmp_path):
    """There is no shared lock: another user's flock (or a FIFO) named like the old ``.lock`` neither slows nor
    blocks a reclaim, a reservation or a release."""
    d = rdir(tmp_path / "r")
    d.ensure()
    write_record(tmp_path / "r", record(port=20000, owner="old", expires=1.0))
    fd = os.open(tmp_path / "r" / ".lock", os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.mkfifo(tmp_path / "r" / ".lock2")
    try:
        started = time.monotonic()
        assert d.reserve("s1", 1, [20000])[0] == [20000]  # the stale claim is reclaimed at once
        assert d.release("s1") == [20000]
        assert time.monotonic() - started < 1.0
    finally:
        os.close(fd)


# ---------------------------------------------------------------- races


def test_threads_never_share_a_port(tmp_path):
    cands = list(range(20000, 20060))

    def one(i):
        # every thread starts at the same candidate: maximal contention
        d = rdir(tmp_path / "r", rng=random.Random(0))
        return d.reserve(f"t{i}", 2, cands)[0]

    with ThreadPoolExecutor(max_workers=30) as pool:
        results = list(pool.map(one, range(30)))
    ports = [p for r in results for p in r]
    assert len(ports) == 60 and len(set(ports)) == 60


def test_reclaimers_race_for_one_stale_port(tmp_path):
    port = free_tcp_ports(1)[0]  # one that binds now: a busy port would rightly have no winner
    d0 = rdir(tmp_path / "r")
    d0.ensure()
    write_record(tmp_path / "r", record(port=port, expires=1.0))
    barrier = threading.Barrier(12)

    def one(i):
        barrier.wait()
        try:
            return rdir(tmp_path / "r").reserve(f"t{i}", 1, [port])[0]
        except PortError:
            return []

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, range(12)))
    assert sorted(map(len, results)) == [0] * 11 + [1]
    winner = "t%d" % next(i for i, r in enumerate(results) if r)
    # the winner's claim (port-N, or the same file renamed aside by a reclaimer that raced it)
    assert [rec["owner"] for rec in claims_of(tmp_path / "r", port).values()] == [winner]


def _reserve_in_process(args):
    path, owner, cands = args
    d = ReservationDir(path, me=Me(uid=os.geteuid(), user="p", host="hostA", boot_id="b"),
                       bindable=lambda p: True, rng=random.Random(1))
    try:
        return d.reserve(owner, 1, cands)[0]
    except PortError:
        return []


def test_processes_never_share_a_port(tmp_path):
    cands = list(range(21000, 21016))
    with ProcessPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(_reserve_in_process, [(str(tmp_path / "r"), f"p{i}", cands) for i in range(20)]))
    ports = [p for r in results for p in r]
    assert len(ports) == 16 and sorted(ports) == cands  # 16 winners, 4 refused, no duplicates


# ---------------------------------------------------------------- the plain script, and a second user


@pytest.fixture(scope="module")
def script():
    """A world-readable copy of _ports.py, so a second user can run it as the batch job would."""
    d = Path(tempfile.mkdtemp(prefix="fp-script-", dir="/tmp"))
    os.chmod(d, 0o755)  # noqa: S103
    copy = d / "_ports.py"
    shutil.copy(SCRIPT, copy)
    os.chmod(copy, 0o644)
    yield copy
    shutil.rmtree(d, ignore_errors=True)


def run_script(script, *args, user=None):
    """Run the module_utils file as a plain script with the managed hosts' /usr/bin/python3."""
    pre = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    return subprocess.run(pre + ["/usr/bin/python3", str(script), *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, check=False)


def test_script_reserve_and_release(script, tmp_path):
    ports = free_tcp_ports(4)
    rng = f"{ports[0]}-{ports[-1]}"
    res = run_script(script, "reserve", "--owner", "job1", "--count", "2", "--range", rng, "--dir", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["ports"]) == 2 and set(out["ports"]) <= set(ports) and out["port"] == out["ports"][0]
    again = json.loads(run_script(script, "reserve", "--owner", "job1", "--count", "2", "--range", rng,
                                  "--dir", str(tmp_path / "r")).stdout)
    assert again["ports"] == out["ports"] and again["new"] == []
    rel = run_script(script, "release", "--owner", "job1", "--dir", str(tmp_path / "r"))
    assert json.loads(rel.stdout)["released"] == out["ports"]
    assert not list((tmp_path / "r").glob("port-*"))


@pytest.mark.parametrize("args, field", [
    (["--owner", "../x"], "owner"), (["--owner", "a\nb"], "owner"), (["--owner", "a;b"], "owner"),
    (["--owner", "ok", "--range", "80-90"], "port_range"), (["--owner", "ok", "--count", "65"], "count"),
    (["--owner", "ok", "--dir", "rel"], "reservation_dir"), (["--owner", "ok", "--exclude", "x"], "exclude"),
])
def test_script_refuses_bad_input(script, args, field):
    res = run_script(script, "reserve", *args)
    assert res.returncode == 1 and res.stdout == ""
    assert json.loads(res.stderr)["field"] == field


@as_root
def test_other_users_expired_file_is_ignored_and_root_reclaims(script, shared_dir):
    p0, p1, p2, p3 = free_tcp_ports(4)
    past = time.time() - 7200
    root = ReservationDir(str(shared_dir), clock=lambda: past)
    root.reserve("rootjob", 1, [p0], lease=60)  # expired an hour ago
    root.reserve("rootlive", 1, [p1], lease=3600 * 24)  # valid
    assert stat.S_IMODE(os.lstat(shared_dir).st_mode) == 0o1777
    # nobody cannot unlink root's expired file in the sticky dir, but it holds nothing: nobody gets p0 under the
    # port's next name; root's valid claim on p1 is respected
    res = run_script(script, "reserve", "--owner", "nb", "--range", f"{p0}-{p1}", "--dir", str(shared_dir),
                     user=NOBODY)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ports"] == [p0]
    assert (shared_dir / f"port-{p0}").stat().st_uid == 0 and (shared_dir / f"port-{p0}.1").stat().st_uid == NOBODY
    taken = run_script(script, "reserve", "--owner", "nb2", "--range", str(p1), "--dir", str(shared_dir), user=NOBODY)
    assert taken.returncode == 1 and json.loads(taken.stderr)["field"] == "count"
    # release by nobody removes nobody's files only
    assert json.loads(run_script(script, "release", "--owner", "rootjob", "--dir", str(shared_dir),
                                 user=NOBODY).stdout)["released"] == []
    assert json.loads(run_script(script, "release", "--owner", "nb", "--dir", str(shared_dir),
                                 user=NOBODY).stdout)["released"] == [p0]
    # root's release of an owner does not remove another uid's file of the same owner
    res = run_script(script, "reserve", "--owner", "shared", "--range", str(p3), "--dir", str(shared_dir), user=NOBODY)
    assert res.returncode == 0, res.stderr
    assert ReservationDir(str(shared_dir)).release("shared") == []
    nst = (shared_dir / f"port-{p3}").stat()
    assert nst.st_uid == NOBODY and stat.S_IMODE(nst.st_mode) == 0o600
    assert json.loads((shared_dir / f"port-{p3}").read_text())["owner"] == "shared"
    # once expired, root reclaims its own and nobody's stale files
    later = ReservationDir(str(shared_dir), clock=lambda: time.time() + 7200, bindable=lambda p: True)
    assert later.reserve("r2", 2, [p0, p3])[0] == [p0, p3]


@as_root
def test_a_foreign_non_sticky_dir_is_refused_for_a_second_user(script, shared_dir):
    shared_dir.mkdir(mode=0o777)
    os.chmod(shared_dir, 0o777)  # noqa: S103
    res = run_script(script, "reserve", "--owner", "nb", "--dir", str(shared_dir), user=NOBODY)
    assert res.returncode == 1 and "sticky" in json.loads(res.stderr)["error"]
    assert not list(shared_dir.iterdir())


# ---------------------------------------------------------------- claims as other users see them (pure)


def claim(name="port-20000", *, uid=1001, regular=True, nlink=1, mtime=2000.0, ino=1, dev=1, ctime=900.0) -> Claim:
    return Claim(name=name, port=_ports.claim_port(name), uid=uid, regular=regular, nlink=nlink, mtime=mtime,
                 ctime=ctime, ino=ino, dev=dev)


@pytest.mark.parametrize("name, port", [("port-20000", 20000), ("port-20000.1", 20000), ("port-1024.999", 1024),
                                        ("port-20000.r0123456789abcdef", 20000)])
def test_claim_names(name, port):
    assert _ports.claim_port(name) == port


@pytest.mark.parametrize("name", ["port-20000.0", "port-20000.1000", "port-20000.", "port-", "port-x", ".lock",
                                  "port-20000.rXYZ", "port-123456", ".tmp.1.0123456789abcdef", "port-20000/x",
                                  "port-20000.01"])
def test_other_names_are_not_claims(name):
    assert _ports.claim_port(name) is None


def test_claim_name_generations():
    assert [_ports.claim_name(20000, g) for g in (0, 1, 12)] == ["port-20000", "port-20000.1", "port-20000.12"]
    assert all(_ports.claim_port(_ports.claim_name(20000, g)) == 20000 for g in range(_ports.MAX_GENERATION + 1))


NOW = 1000.0


@pytest.mark.parametrize("kw, live", [
    ({}, True),                                                      # a regular file, one link, lease running
    ({"mtime": NOW}, False),                                         # the lease ends now
    ({"mtime": NOW - 1}, False),                                     # ... or ended
    ({"regular": False}, False),                                     # a symlink, a FIFO, a directory
    ({"nlink": 2}, False),                                           # hard-linked: not a claim as published
    ({"mtime": NOW + _ports.MAX_LEASE + _ports.FUTURE_SLACK}, True),  # the longest lease
    ({"mtime": NOW + _ports.MAX_LEASE + _ports.FUTURE_SLACK + 1}, False),  # "never expires": junk
])
def test_live_by_metadata(kw, live):
    assert _ports.live_by_metadata(claim(**kw), NOW) is live


def test_a_user_over_the_cap_has_no_claim_that_counts():
    many = [claim(name=f"port-{20000 + i}", uid=7, ino=i) for i in range(4)]
    few = [claim(name=f"port-{21000 + i}", uid=8, ino=100 + i) for i in range(3)]
    dead = [claim(name=f"port-{22000 + i}", uid=9, ino=200 + i, mtime=NOW - 1) for i in range(9)]
    # one file under many names (hard links) counts once
    linked = [claim(name=f"port-{23000 + i}", uid=10, ino=300, nlink=9) for i in range(9)]
    claims = many + few + dead + linked
    assert _ports.over_cap(claims, NOW, cap=3) == {7}
    assert _ports.live_count(claims, 7, NOW) == 4 and _ports.live_count(claims, 9, NOW) == 0
    assert not _ports.foreign_claim_valid(many[0], NOW, {7})
    assert _ports.foreign_claim_valid(few[0], NOW, {7})
    assert not _ports.foreign_claim_valid(dead[0], NOW, {7})


def fake_stat(mode, uid):
    return os.stat_result((mode, 1, 1, 2, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize("mode, owner, me, problem", [
    (stat.S_IFDIR | 0o1777, 0, 1001, None),                 # the shared directory
    (stat.S_IFDIR | 0o1777, 0, 0, None),
    (stat.S_IFDIR | 0o755, 0, 1001, None),                  # root's, not writable by others (the caller cannot write)
    (stat.S_IFDIR | 0o777, 0, 1001, "not sticky"),          # anyone could remove anyone's claims
    (stat.S_IFDIR | 0o775, 0, 1001, "not sticky"),
    (stat.S_IFDIR | 0o700, 1001, 1001, None),               # the caller's private one
    (stat.S_IFDIR | 0o1777, 1001, 1001, "must be owned by root"),
    (stat.S_IFDIR | 0o1777, 1002, 1001, "not root"),        # made by another user: it could block or remove all
    (stat.S_IFDIR | 0o700, 1002, 1001, "not root"),
    (stat.S_IFLNK | 0o777, 0, 1001, "symlink"),
    (stat.S_IFREG | 0o644, 0, 1001, "not a directory"),
])
def test_dir_problem(mode, owner, me, problem):
    got = _ports.dir_problem(fake_stat(mode, owner), me)
    assert got is None if problem is None else problem in got


def test_the_refusal_tells_the_admin_what_to_run():
    text = _ports.admin_fix("/tmp/isession-ports")
    assert "install -d -o root -g root -m 1777 /tmp/isession-ports" in text
    assert "d /tmp/isession-ports 1777 root root -" in text


# ---------------------------------------------------------------- the directory as another user would find it


def test_a_missing_directory_is_not_made_by_an_ordinary_user(tmp_path):
    user = Me(uid=4242, user="u", host="hostA", boot_id="b")
    d = ReservationDir(str(tmp_path / "r"), me=user, bindable=lambda p: True)
    for call in (lambda: d.reserve("s1", 1, [20000]), lambda: d.predict("s1", 1, [20000]), d.ensure):
        with pytest.raises(PortError, match="does not exist: an administrator") as err:
            call()
        assert err.value.field == "reservation_dir"
    assert not (tmp_path / "r").exists()
    assert d.release("s1") == [] and d.held("s1") == []


@as_root
def test_a_directory_made_by_another_user_is_refused_with_the_fix(tmp_path):
    target = tmp_path / "r"
    target.mkdir()
    os.chmod(target, 0o1777)  # noqa: S103
    os.chown(target, NOBODY, NOBODY)
    for me in (ME, Me(uid=4242, user="u", host="hostA", boot_id="b")):
        with pytest.raises(PortError) as err:
            ReservationDir(str(target), me=me, bindable=lambda p: True).reserve("s1", 1, [20000])
        assert "is owned by uid 65534" in str(err.value) and "install -d -o root" in str(err.value)
    assert not list(target.iterdir())


@as_root
def test_the_directory_is_used_through_the_descriptor_it_was_checked_by(tmp_path):
    """Swapping the path for a symlink while a reservation runs changes nothing: the claim lands in the directory
    that was checked, never in the symlink's target."""
    path, moved, elsewhere = tmp_path / "r", tmp_path / "r-moved", tmp_path / "elsewhere"
    elsewhere.mkdir()
    d = rdir(path)
    d.ensure()
    swapped = []

    def bindable(port):
        if not swapped:
            os.rename(path, moved)
            path.symlink_to(elsewhere)
            swapped.append(port)
        return True

    d.bindable = bindable
    got, _unused = d.reserve("s1", 1, [20000])
    assert got == [20000] and swapped
    assert json.loads((moved / "port-20000").read_text())["owner"] == "s1"
    assert not list(elsewhere.iterdir())
    with pytest.raises(PortError, match="symlink"):
        d.reserve("s2", 1, [20001])  # the next call opens the path again and refuses the symlink


@as_root
def test_root_makes_a_missing_directory_in_one_step_with_its_final_mode(tmp_path):
    old = os.umask(0o077)
    try:
        rdir(tmp_path / "r").ensure()
    finally:
        os.umask(old)
    st = os.lstat(tmp_path / "r")
    assert stat.S_IMODE(st.st_mode) == 0o1777 and st.st_uid == 0


# ---------------------------------------------------------------- junk, caps and other users' claims


def foreign_file(path: Path, uid: int = NOBODY, mtime: float = None, text: str = "") -> Path:
    """A file another user made (root chowns it; the test runs as root)."""
    path.write_text(text)
    os.chown(path, uid, uid)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@as_root
def test_another_users_junk_in_every_port_blocks_nothing(script, shared_dir):
    """Every port of the window carries junk a third user left: empty files, later generations' names, a symlink, a
    FIFO, a directory, a hard link, a lease "for ever". A second user (nobody, the plain script) cannot remove it and
    claims under each port's next free name; root, which can, sweeps what is removable."""
    ports = free_tcp_ports(6)
    rdir(shared_dir).ensure()
    now = time.time()
    for port in ports:
        foreign_file(shared_dir / f"port-{port}", uid=4242)  # empty, mtime now: no running lease
        foreign_file(shared_dir / f"port-{port}.1", uid=4242, mtime=now + 10 * _ports.MAX_LEASE)  # "for ever"
    os.symlink("/etc/passwd", shared_dir / f"port-{ports[0]}.2")
    os.mkfifo(shared_dir / f"port-{ports[1]}.2")
    (shared_dir / f"port-{ports[2]}.2").mkdir()
    hard = foreign_file(shared_dir / "hard", uid=4242, mtime=now + 600)
    os.link(hard, shared_dir / f"port-{ports[3]}.2")
    res = run_script(script, "reserve", "--owner", "nb", "--count", "6", "--range", f"{ports[0]}-{ports[-1]}",
                     "--dir", str(shared_dir), user=NOBODY)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ports"] == ports
    for port in ports:
        name = f"port-{port}.3" if port in ports[:4] else f"port-{port}.2"
        st = (shared_dir / name).stat()
        assert st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o600, name
    # those claims hold for everyone else, root too (which removes no valid claim while it sweeps)
    with pytest.raises(PortError, match="count"):
        rdir(shared_dir).reserve("s2", 1, ports)
    assert (shared_dir / f"port-{ports[0]}").exists() is False  # root swept the removable junk
    assert json.loads(run_script(script, "release", "--owner", "nb", "--dir", str(shared_dir),
                                 user=NOBODY).stdout)["released"] == ports
    assert rdir(shared_dir).reserve("s2", 6, ports)[0] == ports


@as_root
def test_a_valid_claim_of_another_user_holds_its_port(shared_dir):
    d = rdir(shared_dir)
    d.ensure()
    foreign_file(shared_dir / "port-20000", mtime=time.time() + 600)
    with pytest.raises(PortError, match="count"):
        d.reserve("s1", 1, [20000])
    assert d.reserve("s1", 1, [20000, 20001])[0] == [20001]
    # root removes no valid claim of anyone's while it sweeps
    assert (shared_dir / "port-20000").exists()


@as_root
def test_claims_of_a_user_over_the_cap_are_ignored_and_swept_by_root(shared_dir):
    d = rdir(shared_dir, cap=4)
    d.ensure()
    later = time.time() + 600
    for port in range(20000, 20005):  # 5 live-looking claims: one more than the cap
        foreign_file(shared_dir / f"port-{port}", mtime=later)
    got, _unused = d.reserve("s1", 2, [20000, 20001])
    assert got == [20000, 20001]
    assert not [p for p in shared_dir.iterdir() if p.stat().st_uid == NOBODY]  # root swept them


def test_the_caller_is_held_to_the_cap(tmp_path):
    d = rdir(tmp_path / "r", cap=3)
    d.reserve("a", 2, list(range(20000, 20010)))
    with pytest.raises(PortError, match="you hold 2 live port reservations") as err:
        d.reserve("b", 2, list(range(20000, 20010)))
    assert err.value.field == "count"
    assert d.reserve("b", 1, list(range(20000, 20010)))[1]  # up to the cap is fine
    assert len(d.ports_on_disk()) == 3
    assert d.reserve("b", 1, list(range(20000, 20010)))[1] == []  # held already: no new claim, no refusal


@as_root
def test_threads_never_share_a_port_among_junk(shared_dir):
    """Maximal contention (every thread starts at the same candidate) while every port carries junk of another
    user at its first name: contenders meet on the next name, and still no port is handed out twice.

    Exactly as many ports as asked for, so liveness is not all-or-nothing here: the scan goes through the candidates
    once, and a thread that lost a port to a contender moves on; when that port is freed again (the contender
    withdrew) the thread is already past it and may run out of candidates (PortError). Real ranges hold thousands of
    ports for a few callers. Under the full CI run's load one thread of twenty went without; most runs serve all."""
    cands = free_tcp_ports(40)  # ports that bind now: a busy one is rightly skipped, which is not what this tests
    rdir(shared_dir).ensure()
    for port in cands:
        foreign_file(shared_dir / f"port-{port}")

    def one(i):
        d = rdir(shared_dir, rng=random.Random(0))
        try:
            return d.reserve(f"t{i}", 2, cands)[0]
        except PortError:
            return []

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    ports = [p for r in results for p in r]
    assert len(ports) == len(set(ports)), results  # never a port twice
    assert all(len(r) in (0, 2) for r in results), results  # a caller gets what it asked for, or nothing
    assert len(ports) >= len(cands) // 2, results  # and most are served


def test_a_name_that_keeps_vanishing_is_given_up_for_the_next(tmp_path):
    """Another user creating and removing a port's first name in a loop cannot keep a caller spinning on it."""

    class Toggled(ReservationDir):
        tries = 0

        def _publish(self, fd, res, name):
            if name == f"port-{res.port}":
                self.tries += 1
                return None  # "exists" ...
            return super()._publish(fd, res, name)

        def _claim(self, fd, name):
            return None if name.endswith("-20000") else super()._claim(fd, name)  # ... and gone again

    d = Toggled(str(tmp_path / "r"), me=ME, bindable=lambda p: True)
    if os.geteuid() != 0:
        (tmp_path / "r").mkdir(mode=0o700)
    assert d.reserve("s1", 1, [20000])[0] == [20000]
    assert (tmp_path / "r" / "port-20000.1").exists() and d.tries == 11


def test_another_kind_of_reservation_keeps_its_own_names(tmp_path):
    """A subclass with its own prefix (displays) shares the directory, the rules and the races, never the numbers."""

    class Displays(ReservationDir):
        prefix = "display"

    ports = rdir(tmp_path / "r")
    displays = Displays(str(tmp_path / "r"), me=ME, bindable=lambda n: True)
    assert displays.reserve("s1", 1, [59])[0] == [59] and ports.reserve("s1", 1, [59])[0] == [59]
    assert sorted(os.listdir(tmp_path / "r")) == ["display-59", "port-59"]
    assert _ports.claim_port("display-59.r0123456789abcdef", "display") == 59
    assert _ports.claim_port("display-59") is None
    with pytest.raises(PortError, match="count"):
        Displays(str(tmp_path / "r"), me=ME, bindable=lambda n: True).reserve("s2", 1, [59])
    assert displays.ports_on_disk() == [59] and displays.release("s1") == [59]
    assert ports.held("s1")[0].port == 59 and sorted(os.listdir(tmp_path / "r")) == ["port-59"]

    class Bad(ReservationDir):
        prefix = "../x"

    with pytest.raises(ValueError, match="prefix"):
        Bad(str(tmp_path / "r"))


def contender_appears(d: Path, port: int, now: float, made: list):
    """A bind check that, like a contender publishing at that moment, leaves a valid claim of ``port`` beside ours."""
    def bindable(p):
        if p == port and not made:
            made.append(write_record(d, record(port=port, owner="other", created=now, expires=now + 600),
                                     f"port-{port}.1"))
        return True
    return bindable


def test_contenders_that_withdrew_together_try_again(tmp_path):
    # A contender's valid claim sits beside ours when we look: we withdraw. It withdrew too (it saw ours), so
    # after our random wait nothing holds the port and we take it, not give it up.
    d, made = tmp_path / "r", []

    def sleep(_seconds):
        for path in made:
            path.unlink(missing_ok=True)

    r = rdir(d, sleep=sleep, bindable=contender_appears(d, 20000, time.time(), made))
    r.ensure()
    assert r.reserve("mine", 1, [20000]) == ([20000], [20000])
    assert made and [rec["owner"] for rec in claims_of(d, 20000).values()] == ["mine"]


def test_a_contender_that_stays_keeps_the_port(tmp_path):
    # the contender did not withdraw: after our wait its claim still holds the port, so we give it up
    d, made, waits = tmp_path / "r", [], []
    r = rdir(d, sleep=waits.append, bindable=contender_appears(d, 20000, time.time(), made))
    r.ensure()
    with pytest.raises(PortError):
        r.reserve("mine", 1, [20000])
    assert len(waits) == 1 and [rec["owner"] for rec in claims_of(d, 20000).values()] == ["other"]


def test_a_claim_renamed_aside_by_a_racing_sweeper_is_still_its_owners(tmp_path):
    """A sweeper that judged an old claim stale renames whatever file has its name by then (``_remove``): a fresh
    claim published under that name meanwhile survives under the aside name. Its owner knows it by its file, so it
    neither takes it for a contender nor gives the port up; a release finds it there."""

    class Swept(ReservationDir):
        renamed = False

        def _publish(self, fd, res, name):
            ident = super()._publish(fd, res, name)
            if ident is not None and not self.renamed:
                self.renamed = True
                os.rename(name, f"port-{res.port}.r{'0' * 16}", src_dir_fd=fd, dst_dir_fd=fd)
            return ident

    d = Swept(str(tmp_path / "r"), me=ME, bindable=lambda p: True)
    if os.geteuid() != 0:
        (tmp_path / "r").mkdir(mode=0o700)
    assert d.reserve("s1", 1, [20000]) == ([20000], [20000])
    assert {name: rec["owner"] for name, rec in claims_of(tmp_path / "r", 20000).items()} == {
        f"port-20000.r{'0' * 16}": "s1"}
    assert rdir(tmp_path / "r").reserve("s2", 1, [20000, 20001])[0] == [20001]  # the port is held
    assert d.release("s1") == [20000] and claims_of(tmp_path / "r", 20000) == {}
