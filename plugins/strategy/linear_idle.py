# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
name: linear_idle
author:
  - hpc.interactive developers (@hpc-interactive)
version_added: 0.1.0
short_description: The linear strategy, waiting for a task's result without polling a thousand times a second
description:
  - Runs a play exactly as C(ansible.builtin.linear) does (task by task, every host before the next task).
  - Only the wait for a running task's result differs. ansible-core checks for results every
    C(internal_poll_interval) seconds (0.001 by default), however long the task runs, which costs about 2% of a
    core per C(ansible-playbook) process while a task waits. This strategy sleeps until ansible-core's results
    thread hands a result over or a worker process exits, so a result is taken as soon as it arrives, a worker that
    dies is found at once, and a task that runs for hours costs nothing while it runs (a last look every
    10 minutes, should a change come some other way; a signal to C(ansible-playbook) acts at once, as with
    C(linear), since ansible-core passes it to the workers and their exit wakes the wait).
  - It also loads ansible-core's Jinja filter and test plugins once, in C(ansible-playbook) itself, before the first
    task. ansible-core forks a worker process for every task, and each worker found the lists empty and loaded them
    again (about 6 ms per task, skipped tasks too); a worker now inherits them loaded. The same for the lookup
    plugins (ansible-core's and this collection's), this collection's filter and test plugins, and the modules this
    collection's actions run in the worker (about 10 ms per such task); with C(isession)'s standby this all happens
    before a start is asked for.
  - And it spares C(ansible-playbook) the last collection of Python's garbage collector as it exits (C(gc.freeze) at
    exit, since the memory goes with the process), which scanned every object the run ever made, about 0.09 s at
    the end of every run.
  - An C(isession start) waiting for its queued job keeps one C(ansible-playbook) process waiting for as long as
    the job waits, so C(isession) runs its plays with this strategy unless the user chose one in E(ANSIBLE_STRATEGY).
  - With E(ISESSION_STANDBY_SOCKET) set (C(isession)'s standby, see its documentation), the first play waits before
    its first task, for at most E(ISESSION_STANDBY_FOR) seconds, for one request on that unix socket from a process of
    the same user. The request's extra vars are loaded as a C(-e @FILE) would load them and join the run's extra
    vars; then the play runs. Without a request in time, with a request to end, or with a file C(end) beside the
    socket once it listens, the plays run no task. The variable is removed from the environment once read, so
    nothing the play starts sees it.
notes:
  - Select it with E(ANSIBLE_STRATEGY=hpc.interactive.linear_idle), the C(strategy) setting of C(ansible.cfg)
    or a play's C(strategy) keyword.
"""

EXAMPLES = r"""
# ansible.cfg
# [defaults]
# strategy = hpc.interactive.linear_idle

- name: Start a JupyterLab session that may wait in the queue for a long time
  hosts: localhost
  strategy: hpc.interactive.linear_idle
  roles:
    - role: hpc.interactive.jupyterlab
"""

import atexit
import gc
import json
import multiprocessing.connection
import os
import socket
import struct
import time
from collections import deque

from ansible.errors import AnsibleError
from ansible.plugins.loader import action_loader, filter_loader, lookup_loader, test_loader
from ansible.plugins.strategy.linear import StrategyModule as LinearStrategyModule

# seconds between looks while no result comes and no worker exits: only a last resort (a stopped run, a worker whose
# exit its sentinel cannot tell), since each look wakes a process that may wait for hours (a start whose job is
# queued), and fifty may wait at once
CHECK_EVERY = 600.0
REAP_WAIT = 1.0  # seconds at most for an exiting worker to become reapable (milliseconds in practice)
STANDBY_SOCKET = "ISESSION_STANDBY_SOCKET"
STANDBY_FOR = "ISESSION_STANDBY_FOR"
STANDBY_DEFAULT_FOR = 600.0
STANDBY_END = "end"  # a file beside the socket: the standby is not wanted (made before it listened)
REQUEST_MAX = 4 << 20  # bytes of one request, at most
REQUEST_READ_FOR = 5.0  # seconds a connected client has to send its whole request


class _WakingDeque(deque):
    """The strategy's result queue, waking the waiting strategy on every result.

    ansible-core's results thread appends each task result (under the strategy's ``_results_lock``); each append
    writes a byte into a pipe that :meth:`StrategyModule._wait_on_pending_results` sleeps on. A pipe, not a
    condition: the wait can then sleep on the workers' exits too, and a result that comes between the wait's look
    and its sleep is a byte already there, so the sleep ends at once.
    """

    def __init__(self, items, wake_fd: int):
        super().__init__(items)
        self._wake_fd = wake_fd

    def append(self, x):
        super().append(x)
        try:
            os.write(self._wake_fd, b"!")
        except OSError:  # the pipe is full (a wake-up is pending already) or closed (the play ended)
            pass


def live_sentinels(workers) -> dict:
    """{sentinel: worker} of the worker processes that have not exited yet (a sentinel is readable once it exits)."""
    out = {}
    for worker in workers or ():
        try:
            if worker is not None and worker.exitcode is None:
                out[worker.sentinel] = worker
        except (ValueError, AttributeError):  # not started yet, or closed
            continue
    return out


def reap(worker) -> None:
    """Wait for the exit a worker's sentinel announced: its files are closed before it can be reaped, and until
    then its exit code reads as still running (a wait on it would return at once, again and again)."""
    try:
        worker.join(REAP_WAIT)
    except (AssertionError, ValueError):  # not this process's child, or closed: ansible-core's own check decides
        pass


def drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:  # empty (EAGAIN) or closed
        pass


def load_jinja_plugins(loaders=(filter_loader, test_loader)) -> int:
    """Load the Jinja filter and test plugins in this process, so that every worker forked later inherits them.

    The loaders keep what they loaded (the plugins of ansible-core and of the configured plugin paths, the same lists
    a worker would build on its first template), but a worker's own loading never reaches the process that forks the
    next one. Best effort: a loader that fails here fails again, with its own message, in the worker that needs it.
    Returns how many plugins are loaded.
    """
    count = 0
    for loader in loaders:
        try:
            count += sum(1 for _plugin in loader.all())
        except Exception:  # noqa: BLE001, S112 - the worker loads them itself, as with linear
            continue
    return count


COLLECTION = "hpc.interactive"
COLLECTION_PLUGINS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this collection's plugins/


def collection_plugin_names(kind: str, plugins_dir: str = COLLECTION_PLUGINS) -> list:
    """The names of this collection's plugins of one kind (``action``, ``lookup``, ``filter``, ``test``): the files
    of its ``plugins/<kind>/``, private ones (``_name``) left out."""
    try:
        entries = os.listdir(os.path.join(plugins_dir, kind))
    except OSError:
        return []
    return sorted(e[:-3] for e in entries if e.endswith(".py") and not e.startswith("_"))


def load_task_plugins(lookups=lookup_loader, actions=action_loader, filters=filter_loader, tests=test_loader, *,
                      collection: str = COLLECTION, plugins_dir: str = COLLECTION_PLUGINS) -> int:
    """Load what a worker would load for its task on its own, so that every worker forked later inherits it.

    As with ansible-core's Jinja plugins: a worker loads the lookups its templates call and this collection's filters
    and tests, and one of this collection's in-process actions imports the module it runs (plugin_utils/_inprocess.py),
    and none of it reaches the process that forks the next worker (about 10 ms per module task). Loaded here:
    ansible-core's and this collection's lookup plugins, this collection's filter and test plugins, and the module
    of each of this collection's actions that has one to ``preload``. (The action plugins themselves are loaded here
    by ansible-core before each fork.) A standby (``isession``) does this before its start comes. Best effort, like
    ``load_jinja_plugins``. Returns how many plugins and modules are loaded.
    """
    count = 0
    try:
        count += sum(1 for _plugin in lookups.all(class_only=True))
    except Exception:  # noqa: BLE001, S110 - the worker loads them itself, as with linear
        pass
    for kind, loader in (("lookup", lookups), ("action", actions), ("filter", filters), ("test", tests)):
        for name in collection_plugin_names(kind, plugins_dir):
            try:
                # a Jinja plugin file is named after its plugin in this collection, and loads as a whole
                cls = (loader.get("%s.%s" % (collection, name)) if kind in ("filter", "test")
                       else loader.get("%s.%s" % (collection, name), class_only=True))
                preload = getattr(cls, "preload", None) if kind == "action" else None
                if callable(preload):
                    preload()
            except Exception:  # noqa: BLE001, S112 - as above
                continue
            count += cls is not None
    return count


def skip_last_collection() -> None:
    """At exit, move every object to the collector's permanent generation (once per process).

    Python's finalisation collects garbage one last time, over every object of the process; an ``ansible-playbook``
    that ran a play holds many, and that collection took about 0.09 s of its exit. The handler runs first at exit
    (handlers run last registered, first called) and frees nothing itself: the exit frees it all.
    """
    if not getattr(skip_last_collection, "registered", False):
        atexit.register(gc.freeze)
        skip_last_collection.registered = True  # type: ignore[attr-defined]


def _peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED: pid, uid, gid)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _read_request(conn: socket.socket) -> dict:
    """One JSON object, terminated by a newline or the client's shutdown of its side."""
    conn.settimeout(REQUEST_READ_FOR)
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > REQUEST_MAX:
            raise ValueError("request larger than %d bytes" % REQUEST_MAX)
    request = json.loads(data.decode("utf-8"))
    if not isinstance(request, dict) or not (isinstance(request.get("extravars"), dict) or request.get("end") is True):
        raise ValueError("a request is an object with the extra vars in 'extravars', or 'end': true")
    return request


def wait_for_start(path: str, seconds: float, clock=time.monotonic):
    """Listen on the unix socket ``path`` (made here, 0600) for one request of this user: its open connection and its
    extra vars, or ``None`` when ``seconds`` pass without one or the request says ``end``. Connections of other
    users, and requests that are neither, are answered with the reason and closed; the wait goes on."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    # a unix socket's address holds at most 107 bytes, and a session root can be deeper: bound through the
    # directory's descriptor (the socket is made in that directory all the same). Bound under another name and
    # renamed once it listens: a client that finds the socket's name can connect (between bind and listen it would
    # be refused, and the start would run its own play).
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    name = os.path.basename(path)
    try:
        listener.bind("/proc/self/fd/%d/%s.new" % (dir_fd, name))
        listener.listen(4)
        os.rename(name + ".new", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
        os.umask(old_umask)
    deadline = clock() + seconds
    try:
        if os.path.exists(os.path.join(os.path.dirname(path), STANDBY_END)):
            return None  # ended while it started (the asker looks for the socket after making the mark)
        while True:
            left = deadline - clock()
            if left <= 0:
                return None
            listener.settimeout(left)
            try:
                conn, _addr = listener.accept()
            except TimeoutError:
                return None
            try:
                request = _read_request(conn)  # first: a client refused before it sent would get EPIPE, no answer
                if _peer_uid(conn) != os.getuid():
                    raise ValueError("not this user's process")
            except (OSError, ValueError) as exc:
                _answer(conn, {"taken": False, "error": str(exc)})
                conn.close()
                continue
            if request.get("end") is True:  # the standby is not wanted any more
                _answer(conn, {"taken": False, "ended": True})
                conn.close()
                return None
            return conn, request["extravars"]
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def _answer(conn: socket.socket, doc: dict) -> None:
    try:
        conn.sendall(json.dumps(doc).encode() + b"\n")
    except OSError:
        pass


def load_extravars(loader, directory: str, extravars: dict) -> dict:
    """``extravars`` as ``-e @FILE`` loads them (ansible-core 2.19 trusts such a file's strings as templates, like
    the runner's own extra vars file): written to a 0600 file in ``directory`` and read back by ``loader``."""
    path = os.path.join(directory, "extravars-%d.json" % os.getpid())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(extravars, handle)
    try:
        return loader.load_from_file(path, trusted_as_template=True)
    except TypeError:  # ansible-core before 2.19: no data tags, no keyword
        return loader.load_from_file(path)


_STANDBY = {"expired": False}


class StrategyModule(LinearStrategyModule):
    """``linear`` whose wait for pending results sleeps until a result arrives or a worker exits."""

    def __init__(self, tqm):
        super().__init__(tqm)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        with self._results_lock:
            self._results = _WakingDeque(self._results, self._wake_w)
        load_jinja_plugins()
        load_task_plugins()
        skip_last_collection()

    def run(self, iterator, play_context):
        if self._take_start():
            return super().run(iterator, play_context)
        return self._tqm.RUN_OK

    def _take_start(self) -> bool:
        """The standby's wait (see DOCUMENTATION): False when the plays are to run no task."""
        if _STANDBY["expired"]:
            return False
        path = os.environ.pop(STANDBY_SOCKET, "")
        if not path:
            return True
        try:
            seconds = float(os.environ.pop(STANDBY_FOR, "") or STANDBY_DEFAULT_FOR)
        except ValueError:
            seconds = STANDBY_DEFAULT_FOR
        taken = wait_for_start(path, seconds)
        if taken is None:
            _STANDBY["expired"] = True
            return False
        conn, extravars = taken
        try:
            loaded = load_extravars(self._loader, os.path.dirname(path), extravars)
            # in place: ansible-core's load_extra_vars keeps this same dict for every later caller
            self._variable_manager._extra_vars.update(loaded)
        except Exception as exc:  # noqa: BLE001 - told to the client, which starts without the standby
            _answer(conn, {"taken": False, "error": "%s: %s" % (type(exc).__name__, exc)})
            conn.close()
            _STANDBY["expired"] = True
            return False
        _answer(conn, {"taken": True, "pid": os.getpid()})
        conn.close()
        return True

    def cleanup(self):
        try:
            super().cleanup()  # joins the results thread: nothing appends after it
        finally:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _wait_on_pending_results(self, iterator):
        # ansible-core's loop (StrategyBase._wait_on_pending_results) with its 1 ms sleep replaced by a sleep until a
        # result is appended or a running worker exits (its exit code is then looked at by has_dead_workers)
        ret_results = []
        while self._pending_results > 0 and not self._tqm._terminated:
            if self._tqm.has_dead_workers():
                raise AnsibleError("A worker was found in a dead state")
            results = self._process_pending_results(iterator)
            ret_results.extend(results)
            if self._pending_results > 0 and not results:
                workers = live_sentinels(self._tqm._workers)
                for ready in multiprocessing.connection.wait([self._wake_r, *workers], timeout=CHECK_EVERY):
                    if ready == self._wake_r:
                        drain(self._wake_r)
                    else:
                        reap(workers[ready])
        return ret_results
