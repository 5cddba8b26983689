# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run external commands as argv lists with ``LC_ALL=C`` and a hard timeout.

Private to the hpc.interactive collection: no compatibility promise outside it.
Standard library only, so the same code runs inside modules, batch jobs and plain scripts.
A command that runs past its timeout is killed with its whole process group and reported
with ``timed_out=True`` (callers map that to *undetermined*, never to a failure state).
"""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Tuple

C_LOCALE = {"LC_ALL": "C", "LANG": "C", "LANGUAGE": "C"}


@dataclass(frozen=True)
class CommandResult:
    """The outcome of one command."""

    argv: Tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


# What backends accept so tests can feed recorded conversations: argv, timeout -> result.
Runner = Callable[[Sequence[str], Optional[float]], CommandResult]


def c_locale_env(extra: Optional[Mapping[str, str]] = None, base: Optional[Mapping[str, str]] = None) -> dict:
    """The environment for a parseable command: ``base`` (default: ours) + C locale + ``extra``."""
    env = dict(os.environ if base is None else base)
    env.update(C_LOCALE)
    if extra:
        env.update(extra)
    return env


class Started:
    """A command started by :func:`start`; :meth:`wait` collects it the way :func:`run` does."""

    def __init__(self, args: Tuple[str, ...], proc: Optional[subprocess.Popen[bytes]],
                 input_text: Optional[str] = None, error: str = "") -> None:
        self.args = args
        self.proc = proc
        self._input = None if input_text is None else input_text.encode()
        self._error = error

    def wait(self, timeout: Optional[float] = None) -> CommandResult:
        """Wait up to ``timeout`` s for the exit and the output; on timeout the process group is killed."""
        if self.proc is None:
            return CommandResult(self.args, 127, "", self._error)
        try:
            out, err = self.proc.communicate(input=self._input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc.pid)
            out, err = self.proc.communicate()
            return CommandResult(self.args, -1, _text(out), _text(err), timed_out=True)
        return CommandResult(self.args, self.proc.returncode, _text(out), _text(err))


def start(
    argv: Sequence[str],
    env: Optional[Mapping[str, str]] = None,
    input_text: Optional[str] = None,
    cwd: Optional[str] = None,
) -> Started:
    """Start ``argv`` (never a shell string) in its own process group; collect it later with ``wait``."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a sequence of arguments, not a string")
    args = tuple(str(a) for a in argv)
    if not args:
        raise ValueError("argv is empty")
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=c_locale_env(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        return Started(args, None, error="%s: %s" % (args[0], exc.strerror or exc))
    return Started(args, proc, input_text)


def run(
    argv: Sequence[str],
    timeout: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    input_text: Optional[str] = None,
    cwd: Optional[str] = None,
) -> CommandResult:
    """Run ``argv`` (never a shell string) in its own process group and collect its output."""
    return start(argv, env=env, input_text=input_text, cwd=cwd).wait(timeout)


def runner(timeout: Optional[float] = None, env: Optional[Mapping[str, str]] = None) -> Runner:
    """A :data:`Runner` bound to a default timeout and extra environment."""

    def _run(argv: Sequence[str], call_timeout: Optional[float] = None) -> CommandResult:
        return run(argv, timeout=call_timeout if call_timeout is not None else timeout, env=env)

    return _run


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _text(data: Optional[bytes]) -> str:
    return (data or b"").decode("utf-8", errors="replace")
