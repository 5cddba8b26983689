"""free_port on the test bed: real users, real namespaces, real Ansible.

* 50 concurrent module runs from two users on ``controller`` get 50 distinct ports: one
  ``ansible-playbook`` per user (cluser, cluser2) inside the controller namespace, each over 25
  inventory aliases of the local host with 25 forks; all 50 forks wait at a gate the test opens
  once every one has checked in, so 50 module processes race over one 60-port window. (Two
  ansible controllers with 25 forks each instead of 50 ansible-playbook processes keeps this to
  tens of seconds on 2 cores.)
* 50 concurrent runs of the plain script (``python3 _ports.py reserve``, what a batch job runs)
  from the same two users over a 52-port window: 50 distinct ports, then the window is full.
* A reservation of cluser (made over SSH from workspace) is never handed to cluser2, is idempotent
  when repeated locally, cannot be released by cluser2, and ``absent`` (check mode, real, again)
  frees it.
* A port with a real listener in the controller namespace is never returned.
* The default directory is root's, sticky, and works for both users; one another user made, or a missing one, is
  refused for an ordinary user with what an administrator runs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.bed

MODULE = "hpc.interactive.free_port"
USERS = ("cluser", "cluser2")
HOST = "controller"
CALLS_PER_USER = 25


@pytest.fixture
def resdir(bed):
    """A fresh reservation directory that every bed user can reach: root's, mode 1777, as the install makes it."""
    parent = bed.user_tmpdir(None)
    os.chmod(parent, 0o1777)  # noqa: S103 - like /tmp
    path = parent / "ports"
    path.mkdir()
    os.chmod(path, 0o1777)  # noqa: S103 - shared by all users, sticky, root's
    yield path
    shutil.rmtree(parent, ignore_errors=True)


def local_call(bed, user, args, check=False):
    """One module call as ``user`` inside the controller namespace (local connection)."""
    return bed.ansible_module(MODULE, args, host=HOST, user=user, target="localhost", check=check)


def records(resdir: Path) -> dict:
    """port -> (file owner, record) of the claim files (read as root: they are 0600)."""
    out = {}
    for p in resdir.glob("port-*"):
        st = p.stat()
        assert st.st_mode & 0o777 == 0o600, p
        out[int(re.match(r"port-([0-9]+)", p.name).group(1))] = (st.st_uid, json.loads(p.read_text()))
    return out


def uid(user: str) -> int:
    import pwd  # noqa: PLC0415

    return pwd.getpwnam(user).pw_uid


def listening(bed, port: int) -> bool:
    probe = f"import socket; s = socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', {port}))"
    return bed.run(HOST, ["/usr/bin/python3", "-c", probe], timeout=10).returncode == 0


def test_fifty_concurrent_ansible_calls_from_two_users_get_distinct_ports(bed, resdir):
    window = (25000, 25059)
    slots = [f"slot{i:02d}" for i in range(CALLS_PER_USER)]
    inventory = "[slots]\n" + "\n".join(slots) + (
        "\n[slots:vars]\nansible_connection=local\nansible_python_interpreter=/usr/bin/python3\n")
    # every fork checks in and then waits at a gate (one task, one process per fork); the test opens
    # the gate once all 50 wait there, so both users' module runs start together
    gate = resdir.parent / "gate"
    ready = resdir.parent / "ready"
    ready.mkdir()
    os.chmod(ready, 0o1777)  # noqa: S103 - both users check in here
    waiter = ("import os, sys, time; open(sys.argv[1], 'w').close()\n"
              "while not os.path.exists(sys.argv[2]): time.sleep(0.02)")
    playbook = f"""
- hosts: slots
  gather_facts: false
  tasks:
    - name: check in and wait at the gate
      ansible.builtin.command:
        argv:
          - /usr/bin/python3
          - -c
          - {json.dumps(waiter)}
          - "{ready}/{{{{ owner_prefix }}}}-{{{{ inventory_hostname }}}}"
          - "{gate}"
      changed_when: false
      timeout: 240
    - name: reserve
      {MODULE}:
        owner: "{{{{ owner_prefix }}}}-{{{{ inventory_hostname }}}}"
        port_range: "{window[0]}-{window[1]}"
        reservation_dir: "{resdir}"
"""

    def run(user):
        d = bed.user_tmpdir(user)
        inv = bed.write_user_file(user, d / "inventory.ini", inventory)
        return bed.playbook_json(playbook, host=HOST, user=user, inventory=inv,
                                 extra_vars={"owner_prefix": user}, timeout=300,
                                 env={"ANSIBLE_FORKS": str(CALLS_PER_USER)})

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(USERS)) as pool:
        futures = [pool.submit(run, user) for user in USERS]
        while len(list(ready.iterdir())) < 2 * CALLS_PER_USER and not any(f.done() for f in futures):
            assert time.monotonic() - start < 240, "the playbooks never reached the gate"
            time.sleep(0.1)
        gate.touch()
        results = {user: f.result() for user, f in zip(USERS, futures, strict=True)}
    elapsed = time.monotonic() - start
    ports = {}
    for user, res in results.items():
        assert res.rc == 0, f"{user}: rc={res.rc}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        for slot in slots:
            out = res.task("reserve", slot)
            assert out.get("changed") is True and len(out["ports"]) == 1, out
            ports[f"{user}-{slot}"] = out["port"]
    assert len(ports) == 2 * CALLS_PER_USER
    assert len(set(ports.values())) == 2 * CALLS_PER_USER, f"a port was handed out twice: {ports}"
    assert all(window[0] <= p <= window[1] for p in ports.values())
    on_disk = records(resdir)
    assert {p: rec["owner"] for p, (_ignored, rec) in on_disk.items()} == {p: o for o, p in ports.items()}
    for _port, (file_uid, rec) in on_disk.items():
        assert file_uid == uid(rec["owner"].split("-")[0]) and rec["host"] == HOST
    # the two users' module runs overlapped in time: this was a race, not a queue
    spans = {u: [rec["created"] for _ignored, (file_uid, rec) in on_disk.items() if file_uid == uid(u)] for u in USERS}
    assert min(spans["cluser"]) < max(spans["cluser2"]) and min(spans["cluser2"]) < max(spans["cluser"]), spans
    st = os.lstat(resdir)
    assert stat.S_IMODE(st.st_mode) == 0o1777 and not stat.S_ISLNK(st.st_mode)
    print(f"50 module runs from 2 users in {elapsed:.1f}s")


def test_fifty_concurrent_script_calls_from_two_users_get_distinct_ports(bed, resdir):
    script = bed.collections_path / "ansible_collections/hpc/interactive/plugins/module_utils/_ports.py"
    window = (26000, 26051)
    procs = []
    for i in range(2 * CALLS_PER_USER):
        user = USERS[i % 2]
        argv = ["/usr/bin/python3", str(script), "reserve", "--owner", f"job{i}", "--range",
                f"{window[0]}-{window[1]}", "--dir", str(resdir)]
        procs.append((user, bed.popen(HOST, argv, user=user, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)))
    ports = []
    for user, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{user}: {err}"
        ports.append(json.loads(out)["port"])
    assert len(set(ports)) == 50 and all(window[0] <= p <= window[1] for p in ports)
    # two ports are left in the window; three are not to be had, and nothing leaks from the failure
    full = bed.run(HOST, ["/usr/bin/python3", str(script), "reserve", "--owner", "late", "--count", "3", "--range",
                          f"{window[0]}-{window[1]}", "--dir", str(resdir)], user="cluser")
    assert full.returncode == 1 and json.loads(full.stderr)["field"] == "count"
    assert len(records(resdir)) == 50
    released = bed.run(HOST, ["/usr/bin/python3", str(script), "release", "--owner", "job1", "--dir", str(resdir)],
                       user="cluser2", check=True)
    assert json.loads(released.stdout)["released"] == [ports[1]]


def test_reservation_is_private_idempotent_and_released_by_absent(bed, resdir):
    port = 27000
    mine = {"owner": "sess-a", "port_range": str(port), "reservation_dir": str(resdir)}
    # cluser, over SSH from the workspace (the architecture's path to the controller)
    first = bed.ansible_module(MODULE, mine, host="workspace", user="wsuser", target=HOST)
    assert first.get("changed") is True and first["ports"] == [port], first
    assert records(resdir)[port][0] == uid("cluser")
    # the same request again, locally on the controller: the same reservation, no change
    again = local_call(bed, "cluser", mine)
    assert again.get("changed") is False and again["ports"] == [port], again
    # cluser2 cannot have it ...
    other = local_call(bed, "cluser2", dict(mine, owner="sess-b"))
    assert other.get("failed") is True and other["msg"].startswith("count: "), other
    # ... gets the next one instead (check mode first: predicted, nothing written)
    wider = dict(mine, owner="sess-b", port_range=f"{port}-{port + 1}")
    pred = local_call(bed, "cluser2", wider, check=True)
    assert pred.get("changed") is True and pred["ports"] == [port + 1] and port + 1 not in records(resdir)
    assert local_call(bed, "cluser2", wider)["ports"] == [port + 1]
    # cluser2 cannot release cluser's reservation, even naming its owner
    stolen = local_call(bed, "cluser2", {"owner": "sess-a", "state": "absent", "reservation_dir": str(resdir)})
    assert stolen.get("changed") is False and stolen["released"] == [] and port in records(resdir)
    # absent: check mode keeps the file, the real run removes it, a second run changes nothing
    absent = {"owner": "sess-a", "state": "absent", "reservation_dir": str(resdir)}
    pred = local_call(bed, "cluser", absent, check=True)
    assert pred.get("changed") is True and pred["released"] == [port] and port in records(resdir)
    done = local_call(bed, "cluser", absent)
    assert done.get("changed") is True and done["released"] == [port] and port not in records(resdir)
    assert local_call(bed, "cluser", absent).get("changed") is False
    # now the port is free for cluser2
    assert local_call(bed, "cluser2", dict(mine, owner="sess-c"))["ports"] == [port]
    assert sorted(records(resdir)) == [port, port + 1]
    # hostile owners never reach the file system
    bad = local_call(bed, "cluser", dict(mine, owner="../x"))
    assert bad.get("failed") is True and bad["msg"].startswith("owner: ")


def test_a_port_with_a_real_listener_is_never_returned(bed, resdir):
    base = 28000
    servers = [
        bed.popen(HOST, ["/usr/bin/python3", "-m", "http.server", str(base), "--bind", "0.0.0.0"], user="cluser2",  # noqa: S104
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        bed.popen(HOST, ["/usr/bin/python3", "-m", "http.server", str(base + 1), "--bind", "127.0.0.1"],
                  user="cluser2", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        deadline = time.monotonic() + 20
        while not (listening(bed, base) and listening(bed, base + 1)):
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.2)
        args = {"owner": "lsn", "port_range": f"{base}-{base + 2}", "reservation_dir": str(resdir)}
        got = local_call(bed, "cluser", args)
        assert got.get("changed") is True and got["ports"] == [base + 2], got
        more = local_call(bed, "cluser", dict(args, owner="lsn2", count=2))
        assert more.get("failed") is True and more["msg"].startswith("count: ")
    finally:
        for proc in servers:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=10)
    # without the listeners the same ports are free: they were skipped only because of them
    freed = local_call(bed, "cluser", {"owner": "lsn3", "count": 2, "port_range": f"{base}-{base + 2}",
                                       "reservation_dir": str(resdir)})
    assert freed.get("changed") is True and freed["ports"] == [base, base + 1], freed


def test_default_directory_is_sticky_and_shared(bed):
    owner = f"fp-default-{os.getpid()}"
    res = {u: local_call(bed, u, {"owner": f"{owner}-{u}", "port_range": "29000-29099"}) for u in USERS}
    try:
        for u in USERS:
            assert res[u].get("changed") is True and res[u]["reservation_dir"] == "/tmp/isession-ports", res[u]
        assert res["cluser"]["port"] != res["cluser2"]["port"]
        st = os.lstat("/tmp/isession-ports")
        assert stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and stat.S_IMODE(st.st_mode) & 0o777 == 0o777
        assert st.st_uid == 0
    finally:
        for u in USERS:
            out = local_call(bed, u, {"owner": f"{owner}-{u}", "state": "absent"})
            assert out["released"] == [res[u]["port"]], out


def test_a_directory_another_user_made_or_none_is_refused_with_the_fix(bed, resdir):
    """cluser2 made the reservation directory (sticky, as the first user used to): its owner could remove or block
    every reservation, so cluser is refused, told what an administrator runs; a missing one is not made by a user."""
    theirs = resdir.parent / "theirs"
    bed.run(HOST, ["mkdir", "-m", "1777", str(theirs)], user="cluser2", check=True)
    for path in (theirs, resdir.parent / "missing"):
        res = local_call(bed, "cluser", {"owner": "sess-x", "reservation_dir": str(path)})
        assert res.get("failed") is True and res["field"] == "reservation_dir", res
        assert f"install -d -o root -g root -m 1777 {path}" in res["msg"], res["msg"]
    assert "is owned by uid" in local_call(bed, "cluser", {"owner": "sess-x", "reservation_dir": str(theirs)})["msg"]
    assert not list(theirs.iterdir()) and not (resdir.parent / "missing").exists()
