"""The linear_idle strategy: linear's plays, with a wait for results that sleeps until a result arrives.

The wait loop is driven with a stand-in task queue manager (real forked worker processes, ansible-core's own
dead-worker check) and a thread that hands results over as ansible-core's results thread does;
real plays run through ansible-playbook with the strategy selected the way ``isession`` selects it (the
environment), and must give linear's results: every host through each task, a failed host dropped, a rescue run.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest

from ansible.errors import AnsibleError
from ansible.executor.task_queue_manager import TaskQueueManager
from ansible_collections.hpc.interactive.plugins.strategy import linear_idle
from ansible_collections.hpc.interactive.plugins.strategy.linear_idle import StrategyModule, _WakingDeque

REPO = Path(__file__).resolve().parents[4]
COLLECTIONS = REPO / ".cache" / "collections"  # tests/conftest.py links the checkout there
sys.path.insert(0, str(REPO / "src"))
from isession.play import STRATEGY, runner_env  # noqa: E402


_PIPES: list = []  # the pipes the stand-in strategies opened: closed after each test (cleanup() is not driven)


@pytest.fixture(autouse=True)
def _close_pipes():
    yield
    while _PIPES:
        try:
            os.close(_PIPES.pop())
        except OSError:  # closed by the test itself (cleanup)
            pass


def _strategy(tqm):
    """A strategy whose results come from a thread appending as ansible-core's results thread does."""
    strategy = StrategyModule.__new__(StrategyModule)  # no task queue manager of ansible's: only the wait is driven
    strategy._tqm = tqm
    strategy._results_lock = threading.Condition(threading.Lock())
    strategy._wake_r, strategy._wake_w = os.pipe()
    _PIPES.extend((strategy._wake_r, strategy._wake_w))
    for fd in (strategy._wake_r, strategy._wake_w):
        os.set_blocking(fd, False)
    strategy._results = _WakingDeque([], strategy._wake_w)
    strategy._pending_results = 0
    checks = {"n": 0}

    def process(iterator):
        checks["n"] += 1
        out = []
        with strategy._results_lock:
            while strategy._results:
                out.append(strategy._results.popleft())
        strategy._pending_results -= len(out)
        return out

    strategy._process_pending_results = process
    return strategy, checks


class _Tqm:
    """The task queue manager as the wait sees it: its workers, ansible-core's own dead-worker check, the stop flag."""

    def __init__(self, workers=()):
        self._terminated = False
        self._workers = list(workers)

    has_dead_workers = TaskQueueManager.has_dead_workers


def _results_thread(strategy, results, pause):
    """Hand ``results`` over as ansible-core's results thread does (appended under the lock), ``pause`` s apart."""
    def run():
        for item in results:
            time.sleep(pause)
            with strategy._results_lock:
                strategy._results.append(item)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _worker(seconds, code):
    """A worker process as ansible-core's are (multiprocessing, forked) that exits with ``code`` after ``seconds``."""
    proc = multiprocessing.get_context("fork").Process(target=_exit_after, args=(seconds, code), daemon=True)
    proc.start()
    return proc


def _exit_after(seconds, code):
    time.sleep(seconds)
    os._exit(code)


def test_a_result_appended_by_the_results_thread_wakes_the_waiter():
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    results = _WakingDeque([], write_fd)
    assert not select.select([read_fd], [], [], 0)[0]
    results.append("r")
    assert select.select([read_fd], [], [], 0)[0]
    linear_idle.drain(read_fd)
    assert not select.select([read_fd], [], [], 0)[0]
    os.close(write_fd)
    results.append("after the play")  # the pipe is closed: no error either
    assert list(results) == ["r", "after the play"]
    os.close(read_fd)


def test_the_wait_takes_each_result_as_it_comes_without_polling_in_between():
    strategy, checks = _strategy(_Tqm())
    strategy._pending_results = 3
    t0 = time.monotonic()
    _results_thread(strategy, ["a", "b", "c"], pause=0.4)
    assert strategy._wait_on_pending_results(iterator=None) == ["a", "b", "c"]
    assert time.monotonic() - t0 < 0.4 * 3 + 5  # each result ended the sleep: no wait for CHECK_EVERY (600 s)
    # 1.2 s of waiting: linear checks about 1,200 times; here each result costs two checks (the one that finds the
    # deque empty before it sleeps, the one its wake-up runs)
    assert checks["n"] <= 2 * 3, checks


def test_a_worker_that_dies_wakes_the_wait_at_once():
    worker = _worker(0.3, 9)  # as if killed: ansible-core's check calls every exit code but 0 dead
    try:
        strategy, checks = _strategy(_Tqm([None, worker]))
        strategy._pending_results = 1
        t0 = time.monotonic()
        with pytest.raises(AnsibleError, match="dead state"):
            strategy._wait_on_pending_results(iterator=None)
        assert time.monotonic() - t0 < 30  # its exit woke the wait, long before the last-resort look (600 s)
        assert checks["n"] == 1  # one look before the sleep; the wake-up found the worker dead
    finally:
        worker.join(timeout=30)


def test_a_worker_that_ended_well_does_not_make_the_wait_spin():
    done = _worker(0.0, 0)
    done.join(timeout=30)
    running = _worker(0.2, 0)  # ends while the wait sleeps; its result comes later
    try:
        strategy, checks = _strategy(_Tqm([done, running]))
        strategy._pending_results = 1
        _results_thread(strategy, ["late"], pause=1.0)
        assert strategy._wait_on_pending_results(iterator=None) == ["late"]
        # a look before the sleep, one when the running worker exited, one for the result: no spinning on the exits
        assert checks["n"] <= 3, checks
    finally:
        running.join(timeout=30)


def test_a_stopped_run_waits_for_nothing():
    tqm = _Tqm()
    tqm._terminated = True
    strategy, checks = _strategy(tqm)
    strategy._pending_results = 1
    assert strategy._wait_on_pending_results(iterator=None) == []
    assert checks["n"] == 0


def test_the_strategy_puts_its_waking_queue_in_place_of_ansibles_and_closes_its_pipe(monkeypatch):
    def linear_init(self, tqm):
        self._results_lock = threading.Condition(threading.Lock())
        self._results = deque(["already there"])

    monkeypatch.setattr(linear_idle.LinearStrategyModule, "__init__", linear_init)
    monkeypatch.setattr(linear_idle.LinearStrategyModule, "cleanup", lambda self: None)
    strategy = StrategyModule(tqm=None)
    assert isinstance(strategy._results, _WakingDeque)
    assert list(strategy._results) == ["already there"]
    fds = (strategy._wake_r, strategy._wake_w)
    assert all(not os.get_inheritable(fd) for fd in fds)  # no module's command inherits it
    strategy.cleanup()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_isession_runs_its_plays_with_it_unless_the_user_chose_a_strategy():
    assert STRATEGY == "hpc.interactive.linear_idle"
    assert runner_env_of({})["ANSIBLE_STRATEGY"] == STRATEGY
    assert runner_env_of({"ANSIBLE_STRATEGY": "free"})["ANSIBLE_STRATEGY"] == "free"


def test_isession_skips_the_steps_only_a_play_without_it_needs_keeping_the_users_skips():
    assert runner_env_of({})["ANSIBLE_SKIP_TAGS"] == "session_without_cli"
    assert runner_env_of({"ANSIBLE_SKIP_TAGS": "mine, "})["ANSIBLE_SKIP_TAGS"] == "mine,session_without_cli"


def runner_env_of(base):
    class _Col:
        root = COLLECTIONS

    return runner_env(_Col(), base=dict(base, PATH="/usr/bin:/bin"))


PLAY = """
- name: Linear's semantics under linear_idle
  hosts: one,two
  gather_facts: false
  tasks:
    - name: A task that runs long enough for the wait to back off
      ansible.builtin.command: sleep 1.5
      changed_when: false
    - name: One host fails
      ansible.builtin.fail:
        msg: two fails here
      when: inventory_hostname == 'two'
    - name: Only the host left runs on, and a rescue runs
      block:
        - name: Fail inside a block
          ansible.builtin.command: "false"
      rescue:
        - name: Rescued
          ansible.builtin.copy:
            content: "{{ inventory_hostname }} rescued after {{ ansible_failed_task.name }}\\n"
            dest: "{{ out }}/{{ inventory_hostname }}.txt"
            mode: "0600"
"""


def test_a_real_play_under_the_strategy_gives_linears_results(tmp_path):
    (tmp_path / "play.yml").write_text(PLAY)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="False",
               ANSIBLE_NOCOLOR="1", ANSIBLE_STRATEGY=STRATEGY)
    playbook_cmd = Path(sys.executable).with_name("ansible-playbook")
    argv = [str(playbook_cmd)] if playbook_cmd.exists() else [sys.executable, "-m", "ansible.cli.playbook"]
    if not playbook_cmd.exists() and shutil.which("ansible-playbook"):
        argv = [shutil.which("ansible-playbook")]
    cp = subprocess.run(argv + ["-i", "one,two,", "-c", "local", "play.yml", "-e", f"out={tmp_path}",
                                "-e", "ansible_python_interpreter=" + sys.executable],
                        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path, check=False)
    assert cp.returncode == 2, cp.stdout[-2000:] + cp.stderr[-2000:]  # a host failed
    recap = dict(re.findall(r"^(one|two)\s+:\s+(.*)$", cp.stdout, re.M))
    assert "failed=0" in recap["one"] and "rescued=1" in recap["one"], cp.stdout[-2000:]
    assert "failed=1" in recap["two"] and "rescued=0" in recap["two"], cp.stdout[-2000:]
    assert (tmp_path / "one.txt").read_text() == "one rescued after Fail inside a block\n"
    assert not (tmp_path / "two.txt").exists()
    # both hosts ran the long task before either went on (linear: task by task)
    long_task = cp.stdout.index("TASK [A task that runs long enough")
    assert cp.stdout.index("ok: [one]", long_task) < cp.stdout.index("TASK [One host fails]")
    assert cp.stdout.index("ok: [two]", long_task) < cp.stdout.index("TASK [One host fails]")


TEMPLATING = """
- name: Every task templates with ansible-core's filters and tests
  hosts: localhost
  gather_facts: false
  tasks:
""" + "".join(f"""
    - name: Task {i}
      ansible.builtin.set_fact:
        fact_{i}: "{{{{ ['a', 'b'] | map('upper') | select('string') | list | to_json }}}}"
      when: ('x' | length) is number
""" for i in range(4))


def _filter_loads(tmp_path, strategy):
    """Run TEMPLATING under ``strategy`` with ansible-core's debug log: how often the filter plugins were loaded."""
    (tmp_path / "play.yml").write_text(TEMPLATING)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="False",
               ANSIBLE_NOCOLOR="1", ANSIBLE_STRATEGY=strategy, ANSIBLE_DEBUG="1", ANSIBLE_LOCALHOST_WARNING="False",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="False")
    playbook_cmd = Path(sys.executable).with_name("ansible-playbook")
    argv = [str(playbook_cmd)] if playbook_cmd.exists() else [shutil.which("ansible-playbook")]
    cp = subprocess.run(argv + ["-i", "localhost,", "-c", "local", "play.yml"], capture_output=True, text=True,
                        env=env, timeout=180, cwd=tmp_path, check=False)
    assert cp.returncode == 0 and "ok=4" in cp.stdout, cp.stdout[-2000:] + cp.stderr[-2000:]
    return len(re.findall(r": Loading FilterModule 'core' ", cp.stdout + cp.stderr))


def test_the_filters_are_loaded_once_before_the_workers_fork(tmp_path):
    # (a worker's debug lines go through ansible-playbook's display, so they carry its pid: count them instead)
    assert _filter_loads(tmp_path, STRATEGY) == 1  # once, by ansible-playbook itself: no worker loads them again
    assert _filter_loads(tmp_path, "ansible.builtin.linear") >= 4  # what it saves: one load in every worker


def test_loading_the_jinja_plugins_is_best_effort():
    class Broken:
        def all(self):
            raise RuntimeError("a broken plugin path")

    class Two:
        def all(self):
            return iter(["f1", "f2"])

    assert linear_idle.load_jinja_plugins((Broken(), Two())) == 2


MODULE_TASKS = """
- name: Every task runs one of this collection's in-process modules, with a lookup and one of its tests
  hosts: localhost
  gather_facts: false
  tasks:
""" + "".join(f"""
    - name: Read a record {i}
      hpc.interactive.session_state:
        op: read
        id: nothing-{i}
        root: "{{{{ lookup('ansible.builtin.env', 'ISESSION_TEST_ROOT') }}}}"
      when: "'ls' is hpc.interactive.plain_command"
""" for i in range(3))


def _worker_loads(tmp_path, strategy):
    """Run MODULE_TASKS under ``strategy`` with ansible-core's debug log: how often the env lookup and the
    plain_command test were loaded from their files, and how often a worker imported session_state's module
    (plugin_utils/_inprocess.py says so)."""
    (tmp_path / "play.yml").write_text(MODULE_TASKS)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="False",
               ANSIBLE_NOCOLOR="1", ANSIBLE_STRATEGY=strategy, ANSIBLE_DEBUG="1", ANSIBLE_LOCALHOST_WARNING="False",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="False", ISESSION_TEST_ROOT=str(tmp_path))
    playbook_cmd = Path(sys.executable).with_name("ansible-playbook")
    argv = [str(playbook_cmd)] if playbook_cmd.exists() else [shutil.which("ansible-playbook")]
    cp = subprocess.run(argv + ["-i", "localhost,", "-c", "local", "play.yml",
                                "-e", "ansible_python_interpreter=" + sys.executable],
                        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path, check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0 and "ok=3" in cp.stdout, cp.stdout[-2000:] + cp.stderr[-2000:]
    # loads from the file (not from the loader's cache, which a worker inherits when ansible-playbook loaded it)
    lookups = [line for line in re.findall(r"Loading (?:LookupModule '\S*env'|TestModule '\S*plain_command') from .*",
                                           out) if "found_in_cache=True" not in line]
    imported = re.findall(r"hpc\.interactive\.session_state: its module is imported in the worker", out)
    preloaded = re.findall(r"hpc\.interactive\.session_state: its module was preloaded", out)
    return len(lookups), len(imported), len(preloaded)


def test_lookups_and_in_process_modules_are_loaded_once_before_the_workers_fork(tmp_path):
    # loaded by ansible-playbook itself (one process): no worker loads or imports them again
    assert _worker_loads(tmp_path, STRATEGY) == (2, 0, 3)
    # what it saves: a load of each in every worker
    assert _worker_loads(tmp_path, "ansible.builtin.linear") == (6, 3, 0)


def test_the_collections_actions_and_lookups_are_found_by_name():
    actions = linear_idle.collection_plugin_names("action")
    assert {"free_port", "scheduler_submit", "service_json", "session_ready", "session_state"} <= set(actions)
    assert "session_vocabulary" in linear_idle.collection_plugin_names("lookup")
    assert linear_idle.collection_plugin_names("nosuchkind") == []


def test_loading_the_task_plugins_is_best_effort_and_preloads_the_in_process_modules(tmp_path):
    for kind in ("action", "lookup"):
        (tmp_path / kind).mkdir()
        for name in ("good", "broken", "_private"):
            (tmp_path / kind / (name + ".py")).write_text("")
    preloaded = []

    class Good:
        @classmethod
        def preload(cls):
            preloaded.append("good")

    class Loader:
        def __init__(self, everything):
            self.everything = everything

        def all(self, class_only=False):
            assert class_only  # classes only: loading must not make instances here
            if self.everything is None:
                raise RuntimeError("a broken plugin path")
            return iter(self.everything)

        def get(self, name, class_only=False):
            assert class_only and name != "hpc.interactive._private"
            if name == "hpc.interactive.broken":
                raise ImportError("no such module")
            return Good

    # ansible-core's three lookups, this collection's good lookup (not preloaded: only actions run modules) and
    # its good action, preloaded
    assert linear_idle.load_task_plugins(Loader(["a", "b", "c"]), Loader(None), plugins_dir=str(tmp_path)) == 5
    assert preloaded == ["good"]
    assert linear_idle.load_task_plugins(Loader(None), Loader(None), plugins_dir=str(tmp_path)) == 2


def test_an_in_process_action_preloads_the_module_it_runs():
    from ansible_collections.hpc.interactive.plugins.action.free_port import ActionModule  # noqa: PLC0415

    name = "ansible_collections.hpc.interactive.plugins.modules.free_port"
    sys.modules.pop(name, None)
    ActionModule.preload()
    assert name in sys.modules


LAST_COLLECTION = """
import atexit, gc, sys
sys.path.insert(0, sys.argv[1])
# registered before the strategy's handler, so it runs after it (last registered, first called)
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))
from ansible_collections.hpc.interactive.plugins.strategy.linear_idle import skip_last_collection
before = atexit._ncallbacks()
skip_last_collection()
skip_last_collection()
print("handlers added:", atexit._ncallbacks() - before, "frozen now:", gc.get_freeze_count() > 0)
"""


def test_the_last_garbage_collection_is_skipped_at_exit_only():
    cp = subprocess.run([sys.executable, "-c", LAST_COLLECTION, str(COLLECTIONS)], capture_output=True, text=True,
                        timeout=60, check=False)
    assert cp.returncode == 0, cp.stderr
    # one handler however many plays made a strategy; nothing frozen while the run goes on, everything at its exit
    assert cp.stdout.splitlines() == ["handlers added: 1 frozen now: False", "frozen at exit: True"], cp.stdout


# ---------------------------------------------------------------- the standby's wait (isession.standby)

STANDBY_PLAY = """- hosts: localhost
  gather_facts: false
  vars:
    greeting: from the play
  tasks:
    - name: Say
      ansible.builtin.copy:
        dest: "{{ out }}/said"
        content: "{{ greeting }} / {{ other | default('none') }} / {{ sum | default('') }}"
"""


def _standby_play(tmp_path, seconds, sock_dir=None):
    """ansible-playbook of STANDBY_PLAY under the strategy, told to wait on ``sock_dir/sock`` (``tmp_path/d``)."""
    (tmp_path / "play.yml").write_text(STANDBY_PLAY)
    if sock_dir is None:
        sock_dir = tmp_path / "d"
        sock_dir.mkdir(mode=0o700)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="False",
               ANSIBLE_STRATEGY=STRATEGY, ISESSION_STANDBY_SOCKET=str(sock_dir / "sock"),
               ISESSION_STANDBY_FOR=str(seconds))
    playbook_cmd = Path(sys.executable).with_name("ansible-playbook")
    argv = [str(playbook_cmd)] if playbook_cmd.exists() else [shutil.which("ansible-playbook")]
    proc = subprocess.Popen(argv + ["-i", "localhost,", "-c", "local", "play.yml", "-e", "other=from-the-cli",
                                    "-e", f"out={tmp_path}", "-e", f"ansible_python_interpreter={sys.executable}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, sock_dir / "sock"


def _wait_listening(sock, wait=60.0):
    deadline = time.monotonic() + wait
    while not sock.exists():
        assert time.monotonic() < deadline, "the standby never listened"
        time.sleep(0.02)


def _ask(sock, doc, wait=60.0):
    import json  # noqa: PLC0415
    import socket  # noqa: PLC0415

    _wait_listening(sock, wait)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        conn.sendall(json.dumps(doc).encode() + b"\n")
        return json.loads(conn.makefile().readline())


def test_a_standby_play_runs_with_the_requests_extra_vars_as_if_given_with_e(tmp_path):
    proc, sock = _standby_play(tmp_path, 120)
    try:
        assert not (tmp_path / "said").exists()  # waiting before the first task
        # a malformed request is refused and the standby goes on waiting
        assert _ask(sock, {"extravars": "greeting=x"})["taken"] is False
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        answer = _ask(sock, {"extravars": {"greeting": "from the request", "sum": "{{ 40 + 2 }}"}})
        out, _err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert answer == {"taken": True, "pid": proc.pid}, answer
    assert proc.returncode == 0, out
    # above the play's vars like -e, beside the command line's own -e, templated like -e @FILE
    assert (tmp_path / "said").read_text() == "from the request / from-the-cli / 42"
    assert not sock.exists()


@pytest.mark.parametrize("how", ["expires", "ended"])
def test_a_standby_nobody_takes_runs_no_task(tmp_path, how):
    proc, sock = _standby_play(tmp_path, 1.5 if how == "expires" else 120)
    try:
        if how == "ended":
            assert _ask(sock, {"end": True}) == {"taken": False, "ended": True}
        out, _err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert not (tmp_path / "said").exists() and "TASK [Say]" not in out
    assert not sock.exists()


def test_the_standby_answers_only_its_own_user(tmp_path):
    """SO_PEERCRED: a process of another uid is refused (the socket is 0600 in a 0700 directory besides)."""
    import json  # noqa: PLC0415
    import socket  # noqa: PLC0415

    import tempfile  # noqa: PLC0415

    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    open_dir = Path(tempfile.mkdtemp(prefix="standby-"))  # reachable by another uid, unlike pytest's 0700 tmp
    proc, sock = _standby_play(tmp_path, 120, sock_dir=open_dir)
    try:
        _wait_listening(sock)
        open_dir.chmod(0o755)
        sock.chmod(0o666)
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            try:
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as conn:
                    conn.connect(str(sock))
                    conn.sendall(json.dumps({"extravars": {"greeting": "intruder"}}).encode() + b"\n")
                    os.write(write, conn.makefile().readline().encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        with os.fdopen(read) as reader:
            answer = json.loads(reader.read())
        assert answer == {"taken": False, "error": "not this user's process"}
        assert _ask(sock, {"end": True})["ended"] is True
        out, _err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        shutil.rmtree(open_dir, ignore_errors=True)
    assert proc.returncode == 0 and not (tmp_path / "said").exists(), out


def test_a_standby_marked_to_end_before_it_listened_runs_no_task(tmp_path):
    """isession's retire marks a standby that is still starting (no socket yet to ask): it ends once it listens."""
    sock_dir = tmp_path / "d"
    sock_dir.mkdir(mode=0o700)
    (sock_dir / "end").touch()
    proc, sock = _standby_play(tmp_path, 120, sock_dir=sock_dir)
    try:
        out, _err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "TASK [Say]" not in out, out
    assert not (tmp_path / "said").exists() and not sock.exists()


def test_a_standby_in_a_directory_deeper_than_a_unix_socket_address_is_reached(tmp_path):
    """A unix socket's address holds 107 bytes: the strategy binds, and isession connects, through the directory."""
    from isession import standby  # noqa: PLC0415

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True, mode=0o700)
    assert len(str(deep / "sock")) > 108
    proc, sock = _standby_play(tmp_path, 120, sock_dir=deep)
    try:
        _wait_listening(sock)
        answer = standby._request(sock, {"extravars": {"greeting": "deep"}}, timeout=10)
        out, _err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert answer == {"taken": True, "pid": proc.pid}, answer
    assert proc.returncode == 0, out
    assert (tmp_path / "said").read_text().startswith("deep / ")


def test_the_standby_socket_has_its_name_only_once_it_listens(tmp_path, monkeypatch):
    """A client that finds the socket's name connects: bound under another name, renamed after listen() (a start
    that found the name between bind and listen was refused and ran its own play)."""
    import json  # noqa: PLC0415
    import socket  # noqa: PLC0415

    sock = tmp_path / "sock"
    named_at_listen = []

    class Spy(socket.socket):
        def listen(self, *args):
            named_at_listen.append(sock.exists())
            return super().listen(*args)

    monkeypatch.setattr(linear_idle.socket, "socket", Spy)
    answers = []

    def ask_as_soon_as_named():
        while not sock.exists():
            time.sleep(0.001)
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(sock))
            conn.sendall(json.dumps({"end": True}).encode() + b"\n")
            answers.append(json.loads(conn.makefile().readline()))

    asker = threading.Thread(target=ask_as_soon_as_named, daemon=True)
    asker.start()
    assert linear_idle.wait_for_start(str(sock), 30) is None
    asker.join(10)
    assert named_at_listen == [False]
    assert answers == [{"taken": False, "ended": True}]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither name is left
