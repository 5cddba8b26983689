# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One teardown: what a session may hold, in the order it is undone, each thing with one undo.

Private to the hpc.interactive collection. Every path that ends a session goes through :data:`KINDS`: the cancel
playbook and the start's rescue (the ``session_teardown`` module, once per host side), the watcher's fast cancel and
its clean-up after a job ended (``isession.watcher``, the controller side through ``_remote_server``). The agent's
trap in the batch job only stops what lives inside the job (the server, the job's tunnel, its node port), because
nothing outside the job can reach a compute node.

A session holds things on two sides:

* ``resource``: the host Ansible reaches as the session's ``resource`` (the controller): the batch job or the
  detached agent, the controller-side tunnel, the node ports reserved there;
* ``workspace``: where ``isession`` runs: the local agent (workspace target), processes still listening on the
  session's workspace port, the workspace port's reservation.

The order is the order of :data:`KINDS`: first what serves or forwards traffic (the job, then the tunnel), then
the listeners left over, and only then the port reservations, so that a port is never free for another session
while something of this one still answers on it. Files (the session directories, their logs) are kept: they are
the session's record and what ``isession logs`` and ``describe`` read after the end.

Every undo is idempotent: it looks at what exists now, so it is safe in every state a session can be cancelled in
(nothing reserved yet, queued, starting, running, already ended) and safe to run twice (the watcher's fast cancel
and then the cancel playbook). Adding a resource kind means adding one :class:`Kind` to :data:`KINDS`.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

from ansible_collections.hpc.interactive.plugins.module_utils._vocabulary import job_name

AGENT_STOP = "agent.stop"  # the file the agent polls in its session directory (agent.sh.j2)
RESOURCE = "resource"
WORKSPACE = "workspace"
SIDES = (RESOURCE, WORKSPACE)


@dataclass(frozen=True)
class Holding:
    """What a session may hold, as its record (``state.json``) or a start play's variables say.

    Every field but ``session_id`` may be unknown (None): a cancel may come before the start recorded it.
    """

    session_id: str
    target: Optional[str] = None  # workspace | controller | compute
    scheduler: Optional[str] = None  # slurm | pbs | sge | local
    remote_dir: Optional[str] = None  # the session directory on the resource (may start with ~)
    workspace_port: Optional[int] = None

    @property
    def job_name(self) -> str:
        return job_name(self.session_id)

    @property
    def job_side(self) -> str:
        """Where the job or agent runs: the workspace's own agent, else the resource's scheduler or agent."""
        return WORKSPACE if self.target in (None, WORKSPACE) else RESOURCE

    @classmethod
    def from_record(cls, record: Mapping[str, Any], session_id: Optional[str] = None) -> Holding:
        ports = record.get("ports") or {}
        port = ports.get("workspace")
        return cls(session_id=str(session_id or record["id"]), target=record.get("target"),
                   scheduler=record.get("scheduler"),
                   remote_dir=record.get("remote_dir") or None,
                   workspace_port=port if isinstance(port, int) and not isinstance(port, bool) else None)


@dataclass
class Context:
    """How this host's side is reached: the scheduler commands, the directories, the check mode."""

    runner: Any = None  # _cmd.Runner for scheduler commands; None: the local backend needs none
    user: str = ""
    local_state_dir: Optional[str] = None  # the local backend's job records (None: its default)
    pbs_flavor: str = "torque"
    reservation_dir: Optional[str] = None  # _ports' directory (None: its default)
    timeout: float = 30.0  # a cancel command
    query_timeout: float = 5.0  # a scheduler query
    check: bool = False  # say what would be undone, undo nothing
    listener_wait: float = 1.0  # how long the workspace port's release waits for this user's listener to go
    spare_pids: Tuple[int, ...] = ()  # never signalled (the process doing the teardown)

    def __post_init__(self) -> None:
        if not self.user:
            self.user = pwd.getpwuid(os.getuid()).pw_name
        if not self.spare_pids:
            self.spare_pids = (os.getpid(),)


@dataclass
class Outcome:
    """What one undo did: ``undone`` names what it stopped or released (empty: nothing was left)."""

    kind: str
    side: str
    undone: List[str] = field(default_factory=list)
    error: str = ""
    pending: str = ""  # not undone yet, for a reason that passes (TeardownPending): try again later

    @property
    def changed(self) -> bool:
        return bool(self.undone)

    def as_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "side": self.side, "undone": list(self.undone), "error": self.error,
                "pending": self.pending}


# ---------------------------------------------------------------------------- the undo functions
def _expand(path: Optional[str]) -> Optional[str]:
    return os.path.expanduser(path) if path else None


def undo_job(h: Holding, ctx: Context) -> List[str]:
    """Cancel the session's job (or stop its detached local agent) if one is alive.

    Found by its unique name (``isession-<id>``), not by the recorded job id: a cancel that comes while the submit
    is under way has no id yet. A scheduler that does not answer is an error (nobody can tell whether the job
    lives); a refused cancel of a job that is ending anyway is not (``Backend.cancel_checked``).
    """
    from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._registry import get_backend  # noqa: PLC0415

    backend = get_backend(h.scheduler, state_dir=ctx.local_state_dir, pbs_flavor=ctx.pbs_flavor)
    found = backend.find_by_name(ctx.runner, h.job_name, ctx.user, timeout=ctx.query_timeout)
    if not found.reachable:
        raise TeardownError("scheduler did not answer (%s); cannot tell whether the job is alive" % found.error)
    jobs = found.jobs
    alive = sorted(k for k, v in jobs.items() if v.alive)
    if ctx.check:
        return ["job " + j for j in alive]
    undone = []
    for job_id in alive:
        if h.scheduler == "local":
            if backend.cancel(job_id=job_id):
                undone.append("job " + job_id)
            continue
        out, failed = backend.cancel_checked(ctx.runner, job_id, ctx.timeout, ctx.query_timeout)
        if failed:
            raise TeardownError("cancel of job %s failed: %s" % (job_id, (out.stderr or out.stdout).strip()))
        undone.append("job " + job_id)
    return undone


def undo_agent(h: Holding, ctx: Context) -> List[str]:
    """Ask the agent of a compute session to stop, through ``agent.stop`` in its session directory.

    The job's cancel reaches the agent through the scheduler, but a node the scheduler lost (slurmd gone, the job
    declared NODE_FAIL) is reached by nothing: its agent, server and tunnel go on running. The session directory is
    on the file system the compute nodes share with the controller, and the agent polls it every 0.5 s (then stops
    as on a cancel: server, tunnel, node port). Written once (exclusive create, 0600, never through a symlink), and
    only into a directory of this user's.
    """
    directory = _expand(h.remote_dir) or ""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return []  # cancelled before the submit made it: no agent
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise TeardownError("%s is not a directory of %s; no stop request written there" % (directory, ctx.user))
    path = os.path.join(directory, AGENT_STOP)
    if os.path.lexists(path):
        return []
    if ctx.check:
        return ["agent stop request"]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return []
    with os.fdopen(fd, "w") as handle:
        handle.write("the session ended\n")
    return ["agent stop request"]


def undo_tunnel(h: Holding, ctx: Context) -> List[str]:
    """Stop the controller-side tunnel (the reverse_tunnel supervisor and its ssh) of a controller session."""
    from ansible_collections.hpc.interactive.plugins.module_utils import _tunnel  # noqa: PLC0415

    state_dir = os.path.join(_expand(h.remote_dir) or "", "tunnel")
    name = h.job_name
    if ctx.check:
        return ["tunnel " + name] if _tunnel.probe(state_dir, name)["running"] else []
    return ["tunnel " + name] if _tunnel.stop_tunnel(state_dir, name) else []


def _release_ports(h: Holding, ctx: Context, what: str) -> List[str]:
    from ansible_collections.hpc.interactive.plugins.module_utils._ports import ReservationDir  # noqa: PLC0415

    rdir = ReservationDir(ctx.reservation_dir) if ctx.reservation_dir else ReservationDir()
    released = rdir.release(h.session_id, dry_run=ctx.check) if rdir.exists() else []
    return ["%s %d" % (what, p) for p in released]


def undo_node_ports(h: Holding, ctx: Context) -> List[str]:
    """Release the ports reserved on the resource for the server (controller target)."""
    return _release_ports(h, ctx, "node port")


def undo_listeners(h: Holding, ctx: Context) -> List[str]:
    """Stop this user's processes still listening on the workspace port once the job is gone.

    What is left there is the loopback end of a tunnel whose other end died with the job (an sshd session process
    of this user), or a workspace server that outlived its agent; the port must be quiet before it is released.
    """
    from ansible_collections.hpc.interactive.plugins.module_utils._proc import socket_holders  # noqa: PLC0415

    if h.workspace_port is None:
        return []
    pids = [p for p in socket_holders(listening_inodes(h.workspace_port, os.getuid())) if p not in ctx.spare_pids]
    if ctx.check:
        return ["listener pid %d" % p for p in pids]
    undone = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            undone.append("listener pid %d" % pid)
        except OSError:
            pass
    return undone


def undo_workspace_port(h: Holding, ctx: Context) -> List[str]:
    """Release the workspace port's reservation (made first of all by a start, so any state may hold it).

    Only once nothing of this user's listens on the port any more, judged from the kernel's socket table by uid: the
    workspace end of a node's tunnel belongs to the user's sshd session process, whose descriptors the user cannot
    read, so ``listeners`` cannot signal it; it goes when the tunnel's other end does (the job's end, or the agent's
    own stop on a lost node). Waits ``ctx.listener_wait`` s for that, then leaves the reservation to a later try
    (:class:`TeardownPending`; the watcher tries again every tick).
    """
    port = h.workspace_port
    if port is not None and not ctx.check:
        deadline = time.monotonic() + ctx.listener_wait
        while listening_inodes(port, os.getuid()):
            if time.monotonic() >= deadline:
                raise TeardownPending("a listener of %s is still on workspace port %d (the end of a tunnel that is "
                                      "still connected?): its reservation stays until it is gone" % (ctx.user, port))
            time.sleep(0.05)
    return _release_ports(h, ctx, "workspace port")


def listening_inodes(port: int, uid: int, proc: str = "/proc") -> List[int]:
    """Socket inodes of ``uid``'s TCP sockets LISTENing on ``port`` (any address; ``_listeners`` reads the table)."""
    from ansible_collections.hpc.interactive.plugins.module_utils._listeners import read_listeners  # noqa: PLC0415

    try:
        found = read_listeners(proc)
    except OSError:
        return []
    return [lst.inode for lst in found if lst.port == port and lst.uid == uid]


# ---------------------------------------------------------------------------- the table
def _on_job_side(h: Holding) -> Optional[str]:
    return h.job_side if h.scheduler else None


def _on_controller(h: Holding) -> Optional[str]:
    return RESOURCE if h.target == "controller" else None


def _on_compute_with_dir(h: Holding) -> Optional[str]:
    return RESOURCE if h.target == "compute" and h.remote_dir else None


def _on_controller_with_dir(h: Holding) -> Optional[str]:
    # a controller session's tunnel, and the only thing a connect session (any remote target) made
    return RESOURCE if h.target in ("controller", "compute") and h.remote_dir else None


def _on_workspace(h: Holding) -> Optional[str]:
    return WORKSPACE


def _kept(h: Holding) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Kind:
    """One kind of thing a session may hold.

    ``where(holding)`` is the side it lives on for that session (None: a session of this shape does not hold it,
    or it is kept); ``undo(holding, context)`` undoes it on that side and returns what it undid.
    """

    name: str
    where: Callable[[Holding], Optional[str]]
    undo: Optional[Callable[[Holding, Context], List[str]]]
    what: str


KINDS: Tuple[Kind, ...] = (
    Kind("job", _on_job_side, undo_job, "the batch job, or the detached agent (local scheduler)"),
    Kind("agent", _on_compute_with_dir, undo_agent,
         "a compute session's agent, asked to stop through agent.stop (it may run on a node the scheduler lost)"),
    Kind("tunnel", _on_controller_with_dir, undo_tunnel,
         "the controller-side reverse tunnel (controller target, connect mode)"),
    Kind("node_ports", _on_controller, undo_node_ports, "ports reserved on the controller for the server"),
    Kind("listeners", _on_workspace, undo_listeners, "this user's processes still listening on the workspace port"),
    Kind("workspace_port", _on_workspace, undo_workspace_port, "the workspace port's reservation"),
    Kind("files", _kept, None, "session directories and logs: kept, they are the record of the session"),
)


class TeardownError(RuntimeError):
    """An undo that could not be carried out (the scheduler did not answer, a cancel was refused)."""


class TeardownPending(TeardownError):
    """An undo that must wait for something already on its way out (a listener that has not closed yet)."""


def plan(h: Holding, side: str, skip: Collection[str] = (), kinds: Sequence[Kind] = KINDS) -> List[Kind]:
    """The kinds to undo on ``side`` for this session, in teardown order, but for those named in ``skip``."""
    if side not in SIDES:
        raise ValueError("side must be one of %s, got %r" % (", ".join(SIDES), side))
    unknown = set(skip) - {k.name for k in kinds}
    if unknown:
        raise ValueError("skip: unknown resource kinds %s" % ", ".join(sorted(unknown)))
    return [k for k in kinds if k.undo is not None and k.name not in skip and k.where(h) == side]


def teardown(h: Holding, side: str, ctx: Context, skip: Collection[str] = (),
             kinds: Sequence[Kind] = KINDS) -> List[Outcome]:
    """Undo everything the session holds on ``side``, in order; one failed undo does not stop the next ones."""
    outcomes = []
    for kind in plan(h, side, skip, kinds):
        out = Outcome(kind.name, side)
        try:
            out.undone = kind.undo(h, ctx)  # type: ignore[misc]
        except TeardownPending as exc:
            out.pending = str(exc)
        except Exception as exc:  # noqa: BLE001 - the next kinds must still be undone; the caller reports it
            out.error = str(exc) if isinstance(exc, TeardownError) else "%s: %s" % (type(exc).__name__, exc)
        outcomes.append(out)
    return outcomes


def errors(outcomes: Sequence[Outcome]) -> List[str]:
    return ["%s: %s" % (o.kind, o.error) for o in outcomes if o.error]


def pending(outcomes: Sequence[Outcome]) -> List[str]:
    return ["%s: %s" % (o.kind, o.pending) for o in outcomes if o.pending]


def scheduler_context(scheduler: Optional[str], path: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
                      resolve: Callable[[str], Optional[str]] = shutil.which, **kwargs: Any) -> Context:
    """A :class:`Context` whose runner finds the scheduler commands in ``path`` first (the resource's
    ``isession_scheduler_path``/``_env``, checked by ``scheduler_setup``)."""
    from ansible_collections.hpc.interactive.plugins.module_utils._schedulers._runtime import (  # noqa: PLC0415
        make_runner,
        scheduler_setup,
    )

    dirs, extra = scheduler_setup(path, env)
    runner = make_runner(resolve, dirs, extra) if scheduler and scheduler != "local" else None
    return Context(runner=runner, **kwargs)
