"""The live progress view of a running playbook (rich), drawn only on a terminal.

One transient block, redrawn four times a second from a :class:`~isession.progress.Progress`: a spinner with the
current step and how long it has run, the time since the command began, and while the job waits in the queue the
scheduler's reason, the queue position and its estimated start. The block disappears when the run ends; the
command then prints its result as usual. Off a terminal nothing is drawn (scripts read the result, or ``--json``),
and rich is not even imported: twenty ``isession cancel`` started at once by a script each save its import time.
"""
from __future__ import annotations

from typing import Any, TextIO

from .progress import Progress, duration


def wanted(stream: TextIO) -> bool:
    """Whether a live view belongs on ``stream``: a terminal that is not ``TERM=dumb``."""
    try:
        if not stream.isatty():
            return False
        from rich.console import Console  # noqa: PLC0415 - only on a terminal

        console = Console(file=stream)
        return console.is_terminal and not console.is_dumb_terminal
    except (AttributeError, ValueError):
        return False


class LiveView:
    """``with LiveView(progress, title, stream):`` draws ``progress`` on ``stream`` while the block runs."""

    def __init__(self, progress: Progress, title: str, stream: TextIO) -> None:
        from rich.console import Console  # noqa: PLC0415 - see the module's docstring
        from rich.spinner import Spinner  # noqa: PLC0415

        self.progress = progress
        self.title = title
        self.console = Console(file=stream, highlight=False)
        self.spinner = Spinner("dots", style="cyan")
        self.live: Any = None

    def render(self) -> Any:
        from rich.console import Group  # noqa: PLC0415 - imported by __init__ already
        from rich.text import Text  # noqa: PLC0415

        p = self.progress
        step = p.step or "starting ansible-playbook"
        line = Text.assemble((step, "bold"), (f"  {duration(p.step_elapsed())}", "dim"))
        self.spinner.update(text=line)
        rows: list = [self.spinner, Text(f"  {self.title} · {duration(p.elapsed())} elapsed", style="dim")]
        queue = p.current_queue()
        if queue is not None:
            rows.append(Text("  " + queue.describe(), style="yellow"))
        return Group(*rows)

    def __enter__(self) -> LiveView:
        from rich.live import Live  # noqa: PLC0415 - see the module's docstring

        self.live = Live(get_renderable=self.render, console=self.console, refresh_per_second=4, transient=True,
                         redirect_stdout=False, redirect_stderr=False)
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None
