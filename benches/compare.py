#!/usr/bin/env python3
"""Run the same workloads on headrace and on its peers, in one run, and compare.

    python benches/compare.py                 # everything, 20,000 tasks, 3 repetitions
    python benches/compare.py --quick         # CI smoke: 2,000 tasks, 1 repetition
    python benches/compare.py --systems headrace,huey --workloads drain_2w,e2e_single

Peers: huey (SqliteHuey and its consumer), persist-queue (SQLiteAckQueue),
litequeue (LiteQueue) and apsw-floor (raw apsw inserts: the SQLite limit for
the submit workloads).  Where a Redis server answers on 127.0.0.1:6379 (or at
$HEADRACE_COMPARE_REDIS_URL), also rq, huey-redis (RedisHuey) and dramatiq;
where PostgreSQL answers on 127.0.0.1:5432 (or at $HEADRACE_COMPARE_PG_DSN),
procrastinate.  Otherwise those are listed as skipped, with the reason.
Install them all with ``pip install '.[compare]'``.
Every SQLite-based system runs WAL + synchronous=NORMAL; the server peers run
the closest match their server allows (Redis: appendonly yes + appendfsync
everysec, as the server is started; PostgreSQL: synchronous_commit=off on each
figure's database).  The report says how each was set and what it reads back.

Each figure runs in a child process of its own (in a fresh temporary
directory with a fresh database; for a server peer, a Redis key namespace or
PostgreSQL database of its own, removed afterwards) under a timeout; workers
and extra producers are processes of their own, started before the clock
starts and released together.  Workers of every system record completions
the same way (one line per task appended to a per-process file), and every
figure checks delivery: tasks completed (or, for the submit workloads,
stored) against submitted, and tasks run more than once.

Prints the environment, progress, then markdown tables; writes everything to
``--json`` (default benches/compare-results.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

try:
    import engine  # noqa: F401
except ImportError:
    # Benchmark the checkout this script lives in (its C extension built in
    # place); child processes inherit the path through PYTHONPATH.
    sys.path.insert(0, REPO)
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")

from peers import ADAPTERS, SYSTEMS, server_peers  # noqa: E402
from peers.base import Adapter, Recorder, payload  # noqa: E402

#: Tasks per call in the batched workloads.
BATCH = 1000
#: Producer processes in single_submit_4p.
PRODUCERS_4P = 4
#: Seconds a helper process gets to open its queue and say "ready".
READY_TIMEOUT = 120.0
#: Seconds stopped workers get to exit before they are killed.
STOP_TIMEOUT = 60.0
#: Seconds between reads of the completion files while waiting.
POLL_RECORDS = 0.01


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "submit", "drain" or "e2e"
    batch: int  # tasks per submit call (1: one by one)
    producers: int
    doc: str


WORKLOADS: Dict[str, Workload] = {w.name: w for w in (
    Workload("batch_submit", "submit", BATCH, 1, "submit in calls of 1,000, 1 producer"),
    Workload("single_submit", "submit", 1, 1, "submit one by one, durable on return, 1 producer"),
    Workload("single_submit_4p", "submit", 1, PRODUCERS_4P,
             "one by one from 4 producer processes at once (tasks/4 each); total tasks/s"),
    Workload("drain_2w", "drain", BATCH, 1, "preload (untimed), then 2 worker processes drain it all"),
    Workload("e2e_single", "e2e", 1, 1,
             "2 workers running, 1 producer one by one; first submit to last completion"),
    Workload("e2e_batch", "e2e", BATCH, 1,
             "2 workers running, 1 producer in batches of 1,000; first submit to last completion"),
    Workload("backlog_growth", "drain", BATCH, 1,
             "drain_2w at each backlog size, rated from the first to the last completion (worker start-up "
             "left out, as it would weigh on small backlogs only): does the rate fall as the backlog grows?"),
)}


class Failure(Exception):
    """A figure that could not be measured; the message goes in the table."""


# ---------------------------------------------------------------------------
# Child roles: figure, workers, producer.  Each is this script run with
# --role, a JSON spec, and (workers, producer) a ready/go handshake on its
# stdout/stdin.


def make_adapter(spec: Dict[str, Any]) -> Adapter:
    return ADAPTERS[spec["system"]](spec["dir"], spec["poll"])


def produce(a: Adapter, first: int, count: int, batch: int) -> None:
    """Submit tasks first..first+count-1; each payload carries its enqueue time."""
    if batch == 1:
        for i in range(first, first + count):
            a.submit(payload(i, time.time()))
        return
    for start in range(first, first + count, batch):
        t = time.time()
        a.submit_batch([payload(i, t) for i in range(start, min(start + batch, first + count))])


def say_ready() -> None:
    print("ready", flush=True)


def wait_go() -> None:
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("the harness went away before the start")


def role_workers(spec: Dict[str, Any]) -> None:
    make_adapter(spec).serve(Recorder(spec["records"]), ready=say_ready, go=wait_go)


def role_producer(spec: Dict[str, Any]) -> None:
    a = make_adapter(spec)
    a.open()
    say_ready()
    wait_go()
    start = time.time()
    produce(a, spec["first"], spec["count"], 1)
    end = time.time()
    a.close()
    print(json.dumps({"start": start, "end": end}), flush=True)


class Helper:
    """One helper process (workers or producer) of the figure."""

    def __init__(self, role: str, spec: Dict[str, Any], log: str) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.p = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--role", role, "--spec", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)

    def readline(self, timeout: float) -> str:
        assert self.p.stdout is not None
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise Failure(f"a helper said nothing within {timeout:.0f} s")
        line = self.p.stdout.readline().decode()
        if not line:
            raise Failure(f"a helper exited with status {self.p.wait()}: {tail(self.log)}")
        return line.strip()

    def wait_ready(self) -> None:
        if self.readline(READY_TIMEOUT) != "ready":
            raise Failure(f"a helper did not start: {tail(self.log)}")

    def go(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(b"go\n")
        self.p.stdin.flush()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for f in (self.p.stdin, self.p.stdout):
            if f is not None:
                f.close()


def tail(path: str, n: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [x.strip() for x in f if x.strip()]
    except OSError:
        return "no log"
    return " | ".join(lines[-n:]) or "no output"


class Completions:
    """Reads the workers' completion files as they grow."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.offsets: Dict[str, int] = {}
        self.partial: Dict[str, bytes] = {}
        self.runs: Dict[int, int] = {}  # task index -> times run
        self.latencies: List[float] = []  # enqueue -> done, first run of each task
        self.first_done = float("inf")
        self.last_done = 0.0

    def read(self) -> None:
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            with open(path, "rb") as f:
                f.seek(self.offsets.get(name, 0))
                data = self.partial.pop(name, b"") + f.read()
                self.offsets[name] = f.tell()
            cut = data.rfind(b"\n") + 1
            if cut < len(data):  # a line being written: keep it for the next read
                self.partial[name] = data[cut:]
            for line in data[:cut].splitlines():
                i_s, t_s, d_s = line.split()
                i, done = int(i_s), float(d_s)
                n = self.runs.get(i, 0)
                self.runs[i] = n + 1
                if n == 0:
                    self.latencies.append(done - float(t_s))
                self.first_done = min(self.first_done, done)
                self.last_done = max(self.last_done, done)

    @property
    def completed(self) -> int:
        return len(self.runs)

    @property
    def duplicates(self) -> int:
        return sum(self.runs.values()) - len(self.runs)


class Workers:
    """The system's worker processes for one figure."""

    def __init__(self, a: Adapter, spec: Dict[str, Any], records: str) -> None:
        wspec = dict(spec, records=records)
        self.helpers: List[Helper] = []
        try:
            for k in range(a.worker_processes):
                self.helpers.append(Helper("workers", wspec, os.path.join(spec["dir"], f"workers{k}.log")))
            for h in self.helpers:
                h.wait_ready()
        except BaseException:
            self.stop()
            raise

    def go(self) -> None:
        for h in self.helpers:
            h.go()

    def wait_all(self, comps: Completions, n: int, stall: float) -> None:
        """Until all n tasks completed; Failure if none completes for `stall` s or the workers die."""
        seen, since = -1, time.monotonic()
        while True:
            comps.read()
            if comps.completed >= n:
                return
            if comps.completed != seen:
                seen, since = comps.completed, time.monotonic()
            elif time.monotonic() - since > stall:
                raise Failure(f"stalled: {comps.completed}/{n} completed, none for {stall:.0f} s")
            if all(h.p.poll() is not None for h in self.helpers):
                raise Failure(f"the workers exited at {comps.completed}/{n}: {tail(self.helpers[0].log)}")
            time.sleep(POLL_RECORDS)

    def stop(self) -> None:
        for h in self.helpers:
            if h.p.poll() is None:
                h.p.send_signal(signal.SIGTERM)
        for h in self.helpers:
            h.stop()


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q * len(sorted_xs)) - 1))
    return sorted_xs[k]


def role_figure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run one figure; the harness reads the returned dict from stdout."""
    wl = WORKLOADS[spec["workload"]]
    n = spec["n"]
    a = make_adapter(spec)
    a.open()
    try:
        res: Dict[str, Any] = {"effective": a.effective()}
        if wl.kind == "submit":
            res.update(submit_figure(a, spec, wl, n))
            res["checked"] = "stored"
            return res
        records = os.path.join(spec["dir"], "records")
        os.mkdir(records)
        comps = Completions(records)
        if wl.kind == "drain":
            produce(a, 0, n, BATCH)  # preload, untimed (a peer without a batch API loops)
            workers = Workers(a, spec, records)
            try:
                t0 = time.time()
                workers.go()
                workers.wait_all(comps, n, spec["stall"])
            finally:
                workers.stop()
        else:
            workers = Workers(a, spec, records)
            try:
                workers.go()
                t0 = time.time()
                produce(a, 0, n, wl.batch)
                workers.wait_all(comps, n, spec["stall"])
            finally:
                workers.stop()
        comps.read()  # runs recorded after the last wait, duplicates included
        seconds = comps.last_done - t0
        res.update(rate=n / seconds, seconds=seconds, delivered=comps.completed, duplicates=comps.duplicates,
                   checked="completed")
        if wl.name == "backlog_growth" and n > 1:
            res.update(rate_from_release=res["rate"], rate=(n - 1) / (comps.last_done - comps.first_done))
        if wl.kind == "e2e":
            lat = sorted(comps.latencies)
            res.update(p50_ms=percentile(lat, 0.50) * 1e3, p99_ms=percentile(lat, 0.99) * 1e3)
        return res
    finally:
        a.close()


def submit_figure(a: Adapter, spec: Dict[str, Any], wl: Workload, n: int) -> Dict[str, Any]:
    if wl.producers == 1:
        t0 = time.perf_counter()
        produce(a, 0, n, wl.batch)
        seconds = time.perf_counter() - t0
    else:
        share = n // wl.producers
        helpers: List[Helper] = []
        try:
            for k in range(wl.producers):
                count = share if k < wl.producers - 1 else n - share * k
                pspec = dict(spec, first=share * k, count=count)
                helpers.append(Helper("producer", pspec, os.path.join(spec["dir"], f"producer{k}.log")))
            for h in helpers:
                h.wait_ready()
            t0 = time.time()
            for h in helpers:
                h.go()
            ends = [json.loads(h.readline(spec["timeout"]))["end"] for h in helpers]
        finally:
            for h in helpers:
                h.stop()
        seconds = max(ends) - t0
    return {"rate": n / seconds, "seconds": seconds, "delivered": a.stored(), "duplicates": 0}


def child_main(role: str, spec: Dict[str, Any]) -> int:
    if role == "workers":
        role_workers(spec)
    elif role == "producer":
        role_producer(spec)
    elif role == "figure":
        try:
            res = role_figure(spec)
        except Failure as e:
            res = {"error": str(e)}
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------------------
# The harness.


def run_figure(args: argparse.Namespace, system: str, workload: str, n: int) -> Dict[str, Any]:
    """One figure in a child process of its own session, under a timeout;
    leaves no process behind."""
    d = tempfile.mkdtemp(prefix=f"compare-{system}-{workload}-", dir=args.dir)
    spec = {"system": system, "workload": workload, "n": n, "dir": d, "poll": args.poll,
            "stall": args.stall, "timeout": args.timeout}
    err_path = os.path.join(d, "figure.log")
    try:
        with open(err_path, "wb") as err:
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", "figure",
                                  "--spec", json.dumps(spec)],
                                 stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
            try:
                out, _ = p.communicate(timeout=args.timeout)
                lines = out.decode(errors="replace").strip().splitlines()
                res = json.loads(lines[-1]) if lines else {"error": f"no result (status {p.returncode}): "
                                                                    f"{tail(err_path)}"}
            except subprocess.TimeoutExpired:
                res = {"error": f"timed out after {args.timeout:g} s"}
            except ValueError:
                res = {"error": f"unreadable result: {tail(err_path)}"}
            left = reap_group(p.pid)
            p.wait()
            if left:
                res.setdefault("warnings", []).append(f"{left} process(es) left behind were killed")
        try:
            ADAPTERS[system](d).cleanup()
        except Exception as e:
            res.setdefault("warnings", []).append(str(e))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return res


def reap_group(pgid: int) -> int:
    """Kill whatever is left in process group `pgid`; how many processes were there."""
    left = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _pgid(pid) == pgid]
    if not left:
        return 0
    try:
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_pgid(pid) == pgid for pid in left):
            time.sleep(0.05)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return len(left)


def _pgid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        # Fields after the command (which may contain spaces): state ppid pgrp ...
        fields = stat[stat.rindex(")") + 2:].split()
        return -1 if fields[0] == "Z" else int(fields[2])
    except (OSError, ValueError, IndexError):
        return -1


def environment(args: argparse.Namespace, systems: List[str]) -> Dict[str, Any]:
    import sqlite3

    import apsw
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "loadavg_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0] + " " + platform.python_implementation(),
        "sqlite_stdlib": sqlite3.sqlite_version + " (sqlite3 module: huey, persist-queue, litequeue)",
        "sqlite_apsw": apsw.sqlite_lib_version() + f" (apsw {apsw.apswversion()}: headrace, apsw-floor)",
        "headrace": f"{SYSTEMS['headrace'].version()} ({commit}) from {os.path.dirname(engine_file())}",
        "versions": {s: SYSTEMS[s].version() for s in systems},
        "tempdir": f"{args.dir or tempfile.gettempdir()} ({fs_type(args.dir or tempfile.gettempdir())})",
    }


def engine_file() -> str:
    import engine
    return os.path.dirname(os.path.abspath(engine.__file__))


def fs_type(path: str) -> str:
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, typ = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, typ
    except OSError:
        pass
    return kind


def not_applicable(a: type, wl: Workload, n: int, args: argparse.Namespace) -> Optional[str]:
    if wl.kind != "submit" and a.worker_processes == 0:
        return "no consumer: submit workloads only"
    if wl.name == "backlog_growth" and n not in args.backlog_sizes and a.name != "headrace":
        return "--big backlog runs headrace only"
    return None


def summarize(reps: List[Dict[str, Any]], n: int) -> Dict[str, Any]:
    ok = [r for r in reps if "error" not in r]
    out: Dict[str, Any] = {"reps": len(reps), "failed": len(reps) - len(ok)}
    if ok:
        rates = [r["rate"] for r in ok]
        out.update(median=statistics.median(rates), min=min(rates), max=max(rates),
                   delivered_min=min(r["delivered"] for r in ok),
                   duplicates_max=max(r["duplicates"] for r in ok),
                   lost_max=max(n - r["delivered"] for r in ok), checked=ok[0]["checked"])
        for k in ("p50_ms", "p99_ms"):
            if all(k in r for r in ok):
                out[k] = statistics.median(r[k] for r in ok)
    errors = sorted({r["error"] for r in reps if "error" in r})
    if errors:
        out["errors"] = errors
    warnings = sorted({w for r in reps for w in r.get("warnings", [])})
    if warnings:
        out["warnings"] = warnings
    return out


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" if x < 10 else f"{x:,.0f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.3f}×" if x < 0.1 else f"{x:.2f}×"


def figure_cell(s: Dict[str, Any]) -> str:
    if "median" not in s:
        return "failed"
    cell = fmt_rate(s["median"])
    if s["reps"] > 1:
        cell += f" ({fmt_rate(s['min'])}–{fmt_rate(s['max'])})"
    return cell


def table(results: List[Dict[str, Any]], systems: List[str], workloads: List[str]) -> List[str]:
    lines = ["| workload | system | tasks/s median (min–max) | vs headrace | p50 ms | p99 ms | delivered "
             "| dups | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for wname in workloads:
        for row in (r for r in results if r["workload"] == wname):
            s, n = row["summary"], row["n"]
            label = wname if wname != "backlog_growth" else f"backlog_growth @ {n:,}"
            if "na" in row:
                lines.append(f"| {label} | {row['system']} | n/a | | | | | | {row['na']} |")
                continue
            base = next((r for r in results if r["workload"] == wname and r["n"] == n
                         and r["system"] == "headrace" and "median" in r.get("summary", {})), None)
            ratio = fmt_ratio(s["median"] / base["summary"]["median"]) if base and "median" in s else ""
            notes = list(row.get("notes", []))
            if "median" in s:
                delivered = f"{s['delivered_min']:,}/{n:,}" + (" stored" if s["checked"] == "stored" else "")
                if s["lost_max"] > 0:
                    delivered = f"**{delivered} LOST {s['lost_max']:,}**"
                dups = f"**{s['duplicates_max']:,}**" if s["duplicates_max"] else "0"
            else:
                delivered = dups = "–"
            if s.get("failed"):
                notes.append(f"{s['failed']}/{s['reps']} failed: " + "; ".join(s.get("errors", [])))
            notes.extend(s.get("warnings", []))
            lines.append(f"| {label} | {row['system']} | {figure_cell(s)} | {ratio} | {fmt_ms(s.get('p50_ms'))} "
                         f"| {fmt_ms(s.get('p99_ms'))} | {delivered} | {dups} | {'; '.join(notes)} |")
    return lines


def backlog_table(results: List[Dict[str, Any]], systems: List[str], sizes: List[int]) -> List[str]:
    rows = [r for r in results if r["workload"] == "backlog_growth"]
    if not rows:
        return []
    lines = ["| system | " + " | ".join(f"drain tasks/s @ {n:,}" for n in sizes) + " | largest/smallest |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for system in systems:
        cells, rates = [], []
        for n in sizes:
            row = next((r for r in rows if r["system"] == system and r["n"] == n), None)
            if row is None or "na" in row:
                cells.append("n/a")
            else:
                cells.append(figure_cell(row["summary"]))
                if "median" in row["summary"]:
                    rates.append(row["summary"]["median"])
        if all(c == "n/a" for c in cells):
            continue
        ratio = f"{rates[-1] / rates[0]:.2f}" if len(rates) >= 2 else "–"
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {ratio} |")
    return lines


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20000, help="tasks per figure (default 20000)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each figure (default 3)")
    ap.add_argument("--systems", default=None,
                    help=f"comma list of {','.join(ADAPTERS)} (default: all available)")
    ap.add_argument("--workloads", default=None, help=f"comma list of {','.join(WORKLOADS)} (default: all)")
    ap.add_argument("--backlogs", default=None,
                    help="comma list of backlog sizes for backlog_growth (default 2000,20000; --quick 200,2000)")
    ap.add_argument("--big", action="store_true", help="backlog_growth also drains 200,000 (headrace only)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: --tasks 2000 --reps 1 --backlogs 200,2000")
    ap.add_argument("--json", default=os.path.join(HERE, "compare-results.json"),
                    help="where to write the results (default benches/compare-results.json)")
    ap.add_argument("--dir", default=None, help="parent of the figures' temporary directories (default: $TMPDIR)")
    ap.add_argument("--poll", type=float, default=0.01,
                    help="seconds a polling worker (huey, persist-queue, litequeue; huey-redis after a BRPOP "
                         "timeout; dramatiq's longest backoff) sleeps on an empty queue (default 0.01)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one figure may take (default 600)")
    ap.add_argument("--stall", type=float, default=60.0,
                    help="seconds without a completion before a drain is declared stalled (default 60)")
    ap.add_argument("--role", choices=("figure", "workers", "producer"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.reps = 2000, 1
        args.backlogs = args.backlogs or "200,2000"
    args.backlog_sizes = [int(x) for x in (args.backlogs or "2000,20000").split(",")]
    if args.tasks < PRODUCERS_4P or args.reps < 1 or min(args.backlog_sizes) < 1:
        ap.error("--tasks must be at least 4, --reps and backlog sizes at least 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.role:
        return child_main(args.role, json.loads(args.spec))
    started = time.monotonic()

    wanted = args.systems.split(",") if args.systems else list(SYSTEMS)
    unknown = [s for s in wanted if s not in ADAPTERS]
    workloads = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    unknown += [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"unknown system or workload: {', '.join(unknown)}", file=sys.stderr)
        return 2
    servers = server_peers()
    server_status = dict(servers)
    # A server peer that is not registered here is skipped for the reason server_peers() gives.
    skipped = {s: SYSTEMS[s].available() if s in SYSTEMS else server_status[s].replace("skipped: ", "", 1)
               for s in wanted}
    systems = [s for s in wanted if skipped[s] is None]
    env = environment(args, systems)

    print("# headrace vs peers\n")
    for k, v in env.items():
        if k == "versions":
            v = ", ".join(f"{s} {ver}" for s, ver in v.items())
        print(f"- {k}: {v}")
    for s, why in skipped.items():
        if why:
            print(f"- {s}: skipped: {why}")
    for name, status in servers:
        if not skipped.get(name):
            print(f"- {name}: {status}")
    print(f"- tasks {args.tasks:,}, reps {args.reps}, backlogs {', '.join(f'{n:,}' for n in args.backlog_sizes)}"
          f"{' + 200,000 (headrace)' if args.big else ''}, payload ~110 bytes JSON, poll {args.poll * 1000:g} ms, "
          f"figure timeout {args.timeout:.0f} s\n")
    sys.stdout.flush()

    results: List[Dict[str, Any]] = []
    effective: Dict[str, Any] = {}
    for wname in workloads:
        wl = WORKLOADS[wname]
        sizes = [args.tasks]
        if wname == "backlog_growth":
            sizes = args.backlog_sizes + ([200_000] if args.big else [])
        for n in sizes:
            rows = {}
            for system in systems:
                row: Dict[str, Any] = {"workload": wname, "system": system, "n": n, "reps": []}
                na = not_applicable(SYSTEMS[system], wl, n, args)
                if na:
                    row["na"] = na
                elif wl.kind != "drain" and wl.batch > 1 and SYSTEMS[system].batch_api is None:
                    row["notes"] = ["one by one in a loop: no batch API"]
                rows[system] = row
                results.append(row)
            for rep in range(args.reps):
                for system in systems:  # systems interleaved within a repetition
                    row = rows[system]
                    if "na" in row:
                        continue
                    res = run_figure(args, system, wname, n)
                    row["reps"].append(res)
                    effective.setdefault(system, res.get("effective"))
                    what = (f"{fmt_rate(res['rate'])} tasks/s in {res['seconds']:.2f} s, "
                            f"{res['delivered']:,}/{n:,} {res['checked']}, {res['duplicates']} dups"
                            if "error" not in res else f"FAILED: {res['error']}")
                    print(f"  {wname:<16} {n:>7,} {system:<14} rep {rep + 1}/{args.reps}: {what}", flush=True)
            for row in rows.values():
                if "na" not in row:
                    row["summary"] = summarize(row["reps"], n)
                else:
                    row["summary"] = {}

    wall = time.monotonic() - started
    report = ["", "## Results", "",
              f"tasks/s: median of {args.reps} repetition(s) (min–max); latency enqueue→done, median over "
              "repetitions of each one's p50/p99; delivered: the worst repetition's completed (or, for submit "
              "workloads, stored) tasks; dups: the most tasks run more than once in a repetition.", ""]
    report += table(results, systems, workloads)
    bt = backlog_table(results, systems, args.backlog_sizes + ([200_000] if args.big else []))
    if bt:
        report += ["", "### Backlog growth: drain rate by backlog size", ""] + bt
    report += ["", "### Systems", ""]
    for s in systems:
        a = SYSTEMS[s](args.dir or tempfile.gettempdir(), args.poll)
        eff = effective.get(s) or {}
        read_back = ", ".join(f"{k}={v}" for k, v in eff.items()) or "?"
        report += [f"- **{s}** {env['versions'][s]}",
                   f"  - durability: {a.durability}; read back: {read_back}",
                   f"  - batch_submit: {a.batch_api or 'one by one in a loop (no batch API)'}",
                   f"  - workers: {a.worker_model or 'none (submit workloads only)'}",
                   f"  - semantics: {a.semantics}"]
    for name, status in servers:
        if name not in systems:
            report.append(f"- {name}: {status}")
    report += ["", "### How each figure is measured", ""]
    report += [f"- {w.name}: {w.doc}" for w in WORKLOADS.values() if w.name in workloads]
    report += ["- Every figure: a fresh temporary directory and database, a child process of its own under a "
               "timeout; helpers open their queues before the clock starts. Drain: from releasing the workers "
               "to the last completion recorded. e2e: from the first submit to the last completion. Workers "
               "record a completion by appending a line from inside the task.",
               f"- Wall time of this run: {wall:,.0f} s; load average at the end: "
               f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (at the start: "
               f"{', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])})."]
    print("\n".join(report))

    with open(args.json, "w") as f:
        json.dump({"environment": env, "args": {k: v for k, v in vars(args).items() if k not in ("role", "spec")},
                   "skipped": {s: w for s, w in skipped.items() if w},
                   "servers": dict(servers), "effective": effective, "results": results,
                   "wall_seconds": wall}, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
