"""Benchmark (not a test): the user's watcher's own CPU per tick while N sessions wait in the queue.

No bed needed. For each N of ``--sessions`` (default 10,50), N queued Slurm sessions are made with the real records
(``_state``, ``_service_file``) in a temporary session root; a :class:`isession.watcher.Watcher` whose scheduler
answers "still queued" for every job (no SSH, no Slurm: only the watcher's own work is measured) ticks ``--ticks``
times, its resource polls run in the ticking thread. Reported: CPU time per tick (process time, all threads) and
per session per tick, the median of ``--runs`` runs. Issue 11's target is that N waiting sessions cost under 5% of
a core in all and not more with N; the watcher ticks every 0.5 s while a session waits, so 1 ms per tick is 0.2%
of a core.
Writes ``--out`` (JSON) and the table beside it (``.txt``), and prints the table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))
import benchlib as bl  # noqa: E402


def collection_root(tmp: Path) -> Path:
    """A collections root holding this checkout's plugins as hpc.interactive (what the watcher imports)."""
    col = tmp / "collections" / "ansible_collections" / "hpc" / "interactive"
    col.mkdir(parents=True)
    (col / "plugins").symlink_to(REPO / "plugins")
    (col / "galaxy.yml").write_text("namespace: hpc\nname: interactive\nversion: 0.0.0\n")
    return tmp / "collections"


class Inline:
    """The watcher's thread pool, run in the caller's thread (so every poll is inside the timed ticks)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, *_args: Any, **_kwargs: Any) -> None:
        return None


def one_run(n: int, ticks: int, tmp: Path, pause: float = 0.0) -> float:
    from isession import watcher as w  # noqa: PLC0415 - after the collection finder is installed
    from ansible_collections.hpc.interactive.plugins.module_utils import (  # noqa: PLC0415
        _service_file,
        _state,
    )

    root = Path(tempfile.mkdtemp(dir=tmp)) / "sessions"
    for i in range(n):
        sid = f"queued-{i:03d}"
        _state.run_op("create", str(root), sid, {"service": "nginx", "target": "compute", "resource": "controller",
                                                 "scheduler": "slurm", "job_id": str(1000 + i), "step": "queued"})
        _service_file.update_service_file(str(root / sid / "service.json"), url="/me", port=20000 + i, slug="",
                                          job_status="Queued", error_message="Priority")

    class Queued(w.Watcher):
        def query(self, key: Any, job_ids: List[str], inventory: Any) -> Dict[str, Any]:
            return {"jobs": {j: {"state": "queued", "raw_state": "PENDING", "reason": "Priority", "found": True}
                             for j in job_ids}, "reachable": True, "error": ""}

        def queue_details(self, key: Any, job_ids: List[str], inventory: Any) -> Dict[str, Any]:
            return {}

    time.sleep(2.1)  # past the "recently modified: read again" window of the record cache (_dirwatch)
    watch = Queued(root, None, log=lambda _msg: None)
    watch.pool.shutdown(wait=True)
    watch.pool = Inline()
    try:
        for _i in range(3):  # the first ticks parse every record and write the queue files
            watch.tick()
        start = time.process_time()
        for _i in range(ticks):
            watch.tick()
            if pause:
                time.sleep(pause)  # as the real watcher sleeps between ticks (sleeping costs no process time)
        return (time.process_time() - start) / ticks
    finally:
        watch.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="10,50", help="comma-separated numbers of queued sessions")
    ap.add_argument("--ticks", type=int, default=400)
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds between ticks, as the real watcher's 0.5 s: the caches are cold at each tick, which "
                    "costs several times what back-to-back ticks cost (default 0: back to back)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    stamp = datetime.now(timezone.utc)
    out_path = args.out or HERE / "results" / f"watcher_tick-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        os.environ["ISESSION_COLLECTIONS"] = str(collection_root(tmp))
        from isession.collection import activate  # noqa: PLC0415

        activate(plugins=False)
        rows = []
        for n in [int(x) for x in args.sessions.split(",") if x]:
            per_tick = [one_run(n, args.ticks, tmp, args.pause) for _r in range(args.runs)]
            st = bl.stats(t * 1000 for t in per_tick)
            rows.append({"sessions": n, "ms_per_tick": st, "us_per_session_tick": st["median"] * 1000 / n,
                         "percent_of_a_core_at_2_ticks_per_s": st["median"] / 1000 * 2 * 100})
    lines = [f"The watcher's own CPU per tick with N queued sessions {stamp:%Y-%m-%d %H:%M} UTC - commit "
             f"{bl.git_commit()}" + (f", {args.pause:g} s between ticks" if args.pause else ", ticks back to back"), "",
             f"{'queued':>6}  {'CPU per tick, ms (min-max)':32} {'per session, us':>16} {'% of a core, 2 ticks/s':>24}"]
    for r in rows:
        lines.append(f"{r['sessions']:>6}  {bl.fmt_stats(r['ms_per_tick'], ' ms', 3):32} "
                     f"{r['us_per_session_tick']:>16.1f} {r['percent_of_a_core_at_2_ticks_per_s']:>23.2f}%")
    bl.save_results(out_path, {"date": f"{stamp:%Y-%m-%d %H:%M} UTC", "commit": bl.git_commit(), "args": vars(args),
                               "rows": rows}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
