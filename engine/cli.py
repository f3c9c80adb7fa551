"""The `headrace` command line."""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
from typing import Any, Dict, List, Optional

from . import __version__, chaos, errors

#: Exit codes.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _open(path: str) -> Any:
    from .api import Queue
    if not os.path.exists(path):
        raise errors.StoreError(f"no database at {path}")
    if not os.path.isfile(path):
        raise errors.StoreError(f"{path} is not a database file (it is a directory or a special file)")
    return Queue(path)


def _when(us: Optional[float]) -> str:
    if us is None:
        return "-"
    return datetime.datetime.fromtimestamp(us).isoformat(sep=" ", timespec="milliseconds")


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run
    return run(tasks=a.tasks, processes=a.processes, path=a.path, batch=a.batch)


def cmd_worker(a: argparse.Namespace) -> int:
    from .api import Queue
    mod_name, _, attr = a.app.partition(":")
    if not mod_name or not attr:
        print(f"headrace worker: expected MODULE:QUEUE, got {a.app!r}", file=sys.stderr)
        return EXIT_USAGE
    sys.path.insert(0, os.getcwd())
    q = getattr(importlib.import_module(mod_name), attr)
    if not isinstance(q, Queue):
        print(f"headrace worker: {a.app} is a {type(q).__name__}, not an engine.Queue", file=sys.stderr)
        return EXIT_USAGE
    return q.run_workers(processes=a.processes, grace=a.grace)


def cmd_stats(a: argparse.Namespace) -> int:
    with _open(a.path) as q:
        s = q.stats()
    if a.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return EXIT_OK
    c = s["counts"]
    print(f"{a.path}")
    for k in ("waiting", "pending", "delayed", "running", "completed", "dead", "cancelled"):
        print(f"  {k:<10} {c[k]:>12,}")
    print(f"  submitted  {s['submitted']:>12,}   spilled to disk {s['spilled']:,}")
    print(f"  in memory  {s['in_memory']:>12,} of {s['capacity']:,} slots; {s['unflushed']:,} changes not yet written")
    print(f"  claims {s['claimed']:,}, fenced {s['fenced']:,}, expired leases {s['expired']:,}, "
          f"lock repairs {s['repairs']:,}; writer {'running' if s['writer_alive'] else 'stopped'}")
    for tid, frac in sorted(s["progress"].items()):
        print(f"  task {tid} running, {frac:.0%} done")
    return EXIT_OK


def cmd_inspect(a: argparse.Namespace) -> int:
    with _open(a.path) as q:
        t = q.get(a.tid)
    if t is None:
        print(f"no task {a.tid} in {a.path}", file=sys.stderr)
        return EXIT_FAILED
    d: Dict[str, Any] = dict(t.__dict__)
    if a.json:
        print(json.dumps(d, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    for k in ("created", "started", "finished"):
        d[k] = _when(d[k])
    for k, v in d.items():
        print(f"{k:>13}: {v}")
    return EXIT_OK


def cmd_retry(a: argparse.Namespace) -> int:
    if a.all == (a.tid is not None):
        print("headrace retry: give one TID or --all", file=sys.stderr)
        return EXIT_FAILED
    with _open(a.path) as q:
        ids = q.retry_all_dead() if a.all else q.retry_dead(a.tid)
    print(f"put {len(ids):,} task{'s' if len(ids) != 1 else ''} back to pending"
          + (f": {', '.join(map(str, ids[:20]))}" if ids else ""))
    return EXIT_OK if ids or a.all else EXIT_FAILED


def cmd_dead(a: argparse.Namespace) -> int:
    with _open(a.path) as q:
        dead = q.dead_letters(a.limit)
    for t in dead:
        err = f"{t.error['type']}: {t.error['message']}" if t.error else "-"
        print(f"{t.id:>12}  {t.name}  attempts {t.attempts}  {err}")
    return EXIT_OK


def cmd_verify(a: argparse.Namespace) -> int:
    with _open(a.path) as q:
        n = q.verify()
    print(f"{a.path}: the segment's invariants hold, the database passes quick_check, "
          f"and both agree on all {n:,} live tasks")
    return EXIT_OK


def cmd_gc(a: argparse.Namespace) -> int:
    from . import paths
    found = paths.stale_segments(remove=not a.dry_run)
    if a.json:
        print(json.dumps([{"segment": p, "why": why} for p, why in found], indent=2))
        return EXIT_OK
    for path, why in found:
        print(f"{'would remove' if a.dry_run else 'removed'} {path}: {why}")
    print(f"{len(found)} stale segment{'s' if len(found) != 1 else ''}"
          f"{' found' if a.dry_run else ' removed'}")
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code."""
    p = argparse.ArgumentParser(prog="headrace", description="headrace task queue engine")
    p.add_argument("--version", action="version", version=f"headrace {__version__}")
    sub = p.add_subparsers(dest="cmd")

    d = sub.add_parser("demo", help="run a real pipeline end to end and print a summary")
    d.add_argument("--tasks", type=int, default=200_000)
    d.add_argument("--processes", type=int, default=2)
    d.add_argument("--batch", type=int, default=1000)
    d.add_argument("--path", default=None, help="database file (default: a temporary one)")
    d.set_defaults(fn=cmd_demo)

    w = sub.add_parser("worker", help="run worker processes for MODULE:QUEUE until SIGTERM/SIGINT")
    w.add_argument("app")
    w.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    w.add_argument("--grace", type=float, default=None, help="seconds running tasks get to finish")
    w.set_defaults(fn=cmd_worker)

    s = sub.add_parser("stats", help="counts by state")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_stats)

    i = sub.add_parser("inspect", help="one task")
    i.add_argument("path")
    i.add_argument("tid", type=int)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    r = sub.add_parser("retry", help="put dead tasks back to pending with fresh attempts")
    r.add_argument("path")
    r.add_argument("tid", type=int, nargs="?")
    r.add_argument("--all", action="store_true", help="every dead task")
    r.set_defaults(fn=cmd_retry)

    dl = sub.add_parser("dead", help="list dead tasks with their last error")
    dl.add_argument("path")
    dl.add_argument("--limit", type=int, default=100)
    dl.set_defaults(fn=cmd_dead)

    v = sub.add_parser("verify", help="check the segment, the database, and that they agree")
    v.add_argument("path")
    v.set_defaults(fn=cmd_verify)

    g = sub.add_parser("gc", help="remove the shared-memory segments that killed writers left of deleted databases")
    g.add_argument("--dry-run", action="store_true", help="only list them")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_gc)

    c = sub.add_parser("chaos", add_help=False,
                       help="kill -9 real processes at random for a while, then check nothing was lost "
                            "(headrace chaos --help)")
    c.add_argument("rest", nargs=argparse.REMAINDER)
    c.set_defaults(fn=lambda a: chaos.main(a.rest))

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chaos"]:  # its own parser, options included
        return chaos.main(argv[1:])
    a = p.parse_args(argv)
    if a.cmd is None:
        print(f"headrace {__version__}")
        p.print_help()
        return EXIT_OK
    try:
        return a.fn(a)
    except errors.EngineError as e:
        print(f"headrace {a.cmd}: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
