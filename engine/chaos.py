"""Chaos: kill -9 real processes at random moments, then check that nothing was lost.

    python -m engine.chaos --seconds 60        # or: headrace chaos --minutes 10

Two producers (one submitting one by one, one in batches), a supervisor with
worker processes, and the writer run against one database.  At random
moments the harness kills one of them with SIGKILL: a worker, the worker
supervisor, the writer, a producer, or everything at once followed by
unlinking the segment (a simulated reboot).  What is meant to live is
started again.  Every process records what it did durably, one whole line
per write(2) on an O_APPEND file: a producer writes ``try TOKEN`` before a
submit and ``ack TOKEN ID`` once it returned; a task writes ``run TOKEN``
when it starts.  At the end the producers stop, the workers drain the
queue, and the harness checks:

- every acknowledged task completed, under the id its submit returned;
- every task stored, acknowledged or not, completed, and no token is stored twice;
- no task ran that was never submitted;
- a task ran more than once only if a kill fell between two of its runs;
- ``Queue.verify()``: the segment's invariants hold, the database passes
  quick_check, and the two agree on every live task.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from . import paths

TASK = "chaos.run"
#: Queue settings of every process: a short lease brings a killed worker's
#: tasks back soon, and a small segment makes the backlog spill to disk.
TUNING = {"lease": 2.0, "capacity": 4096}
KINDS = ("worker", "supervisor", "writer", "producer", "reboot")
#: How often each kind of kill is chosen (after one of each).
WEIGHTS = (30, 10, 25, 20, 15)


# ---- the processes under test -------------------------------------------------------


def _producer(d: str, kind: str, inc: int, seed: int) -> None:
    import engine
    rng = random.Random(seed)
    q = engine.Queue(os.path.join(d, "q.db"), **TUNING)
    log = os.path.join(d, f"producer-{kind}.log")
    stop = os.path.join(d, "stop")
    n = 0
    while not os.path.exists(stop):
        if kind == "single":
            tok = f"s{inc}-{n}"
            n += 1
            paths.append(log, f"try {tok}\n")
            tid = q.submit(TASK, args=(tok,), priority=rng.choice((0, 0, 0, 5, 9)))
            paths.append(log, f"ack {tok} {tid}\n")
            time.sleep(rng.random() * 0.002)
        else:
            # Some batches are big enough to be sent in parts (api.STREAM_MIN).
            size = rng.randint(1, 300) if rng.random() < 0.7 else rng.randint(512, 1500)
            toks = [f"b{inc}-{n + k}" for k in range(size)]
            n += len(toks)
            paths.append(log, "".join(f"try {t}\n" for t in toks))
            prio = rng.choice((0, 1, 9))
            out = q.submit_batch([engine.Job(TASK, args=(t,), priority=prio) for t in toks])
            paths.append(log, "".join(f"ack {t} {o.id}\n" for t, o in zip(toks, out.outcomes)))
            time.sleep(0.05 + rng.random() * 0.1)
    q.close()


def _workers(d: str, processes: int) -> int:
    import engine
    q = engine.Queue(os.path.join(d, "q.db"), **TUNING)
    log = os.path.join(d, "runs.log")

    @q.task(name=TASK)
    def run(tok: str) -> Optional[str]:
        paths.append(log, f"run {tok} {os.getpid()} {time.time():.6f}\n")
        n = int(tok.rpartition("-")[2])
        if n % 7 == 0:
            time.sleep(0.003)  # some work in flight when a kill comes
        return tok if n % 5 == 0 else None  # some results go through the writer

    return q.run_workers(processes=processes)


# ---- the harness -------------------------------------------------------------------


@dataclass
class Report:
    seconds: float = 0.0
    kills: Dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    tried: int = 0
    acked: int = 0
    stored: int = 0
    runs: int = 0
    reruns: int = 0
    live_checked: int = 0
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def cycles(self) -> int:
        return sum(self.kills.values())

    def summary(self) -> str:
        kills = ", ".join(f"{n} {k}" for k, n in self.kills.items())
        lines = [f"{self.cycles} kill cycles in {self.seconds:.0f} s ({kills})",
                 f"{self.tried:,} submits tried, {self.acked:,} acknowledged, {self.stored:,} stored, "
                 f"{self.runs:,} runs ({self.reruns:,} re-runs, each after a kill)",
                 f"{self.live_checked:,} live tasks checked by verify at the end; {len(self.problems)} problems"]
        lines += [f"  PROBLEM: {p}" for p in self.problems[:20]]
        lines.append("OK: nothing lost, nothing run that was not submitted, the database and the segment agree"
                     if self.ok else "FAILED")
        return "\n".join(lines)


class Harness:
    def __init__(self, d: str, workers: int, seed: int, log=print) -> None:
        self.d = d
        self.db = os.path.join(d, "q.db")
        self.workers = workers
        self.rng = random.Random(seed)
        self.seed = seed
        self.log = log
        self.inc = 0
        #: (start, end) of each kill: a reboot takes a while to kill everything.
        self.kill_times: List[Tuple[float, float]] = []
        self.report = Report()
        self.producers: Dict[str, subprocess.Popen] = {}
        self.sup: Optional[subprocess.Popen] = None

    def _spawn(self, *args: str) -> subprocess.Popen:
        err = open(os.path.join(self.d, f"stderr-{args[0]}.log"), "ab")
        try:
            # Run from the run's directory: `-m` puts the working directory first on sys.path,
            # and a checkout there would shadow the installed package.
            return subprocess.Popen([sys.executable, "-m", "engine.chaos", "--dir", self.d, "--role", *args],
                                    stdout=subprocess.DEVNULL, stderr=err, cwd=self.d)
        finally:
            err.close()

    def _start_producer(self, kind: str) -> None:
        self.inc += 1
        self.producers[kind] = self._spawn("producer", "--kind", kind, "--inc", str(self.inc),
                                           "--seed", str(self.rng.randrange(1 << 30)))

    def _start_workers(self) -> None:
        self.sup = self._spawn("workers", "--workers", str(self.workers))

    def _watch(self) -> None:
        """Restart what died of its own accord (it should not: say so)."""
        for kind, p in list(self.producers.items()):
            if p.poll() is not None:
                self.report.problems.append(f"producer {kind} exited by itself with {p.returncode} "
                                            f"(see {self.d}/stderr-producer.log)")
                self._start_producer(kind)
        if self.sup is not None and self.sup.poll() is not None:
            self.report.problems.append(f"the worker supervisor exited by itself with {self.sup.returncode}")
            self._start_workers()

    @staticmethod
    def _kill(pid: Optional[int]) -> None:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self, kind: str) -> None:
        start = time.time()
        self._kill_one(kind)
        self.kill_times.append((start, time.time()))
        self.report.kills[kind] += 1
        paths.append(os.path.join(self.d, "kills.log"), f"{kind} {start:.6f} {time.time():.6f}\n")

    def _kill_one(self, kind: str) -> None:
        import psutil
        if kind == "worker":
            try:
                kids = psutil.Process(self.sup.pid).children()
            except psutil.Error:
                kids = []
            if kids:
                self._kill(self.rng.choice(kids).pid)  # the supervisor replaces it
        elif kind == "supervisor":
            self._kill(self.sup.pid)
            self.sup.wait()
            self._start_workers()  # its orphans finish their batch and exit
        elif kind == "writer":
            self._kill(paths.writer_pid(self.db))  # the next process that needs one restarts it
        elif kind == "producer":
            which = self.rng.choice(sorted(self.producers))
            self._kill(self.producers[which].pid)
            self.producers[which].wait()
            self._start_producer(which)
        else:  # reboot: everything dies (orphaned workers too), shared memory is gone
            from .shm import Segment
            deadline = time.time() + 10
            while True:  # again until none is left: one may have forked or spawned a writer meanwhile
                ours = self._ours()
                if not ours or time.time() > deadline:
                    break
                for pid in ours:
                    self._kill(pid)
                time.sleep(0.01)
            for p in list(self.producers.values()) + [self.sup]:
                p.wait()
            if os.path.exists(self.db):  # (a reboot before anyone created it has nothing to remove)
                Segment.unlink(paths.segment_name(self.db))
            for kind_ in list(self.producers):
                self._start_producer(kind_)
            self._start_workers()

    def _ours(self) -> List[int]:
        """Every live process working on this run's database: producers,
        supervisors, workers (forked: they share the command line) and the writer."""
        import psutil
        out = []
        for p in psutil.process_iter(["cmdline", "status"]):
            if p.pid != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE and \
                    any(self.d in arg for arg in p.info["cmdline"] or ()):
                out.append(p.pid)
        return out

    def run(self, seconds: float) -> Report:
        t0 = time.time()
        self._start_workers()
        for kind in ("single", "batch"):
            self._start_producer(kind)
        # One of each kind first, in a random order; then at random.
        plan = list(KINDS)
        self.rng.shuffle(plan)
        while time.time() - t0 < seconds:
            time.sleep(self.rng.uniform(0.3, 1.2))
            self._watch()
            kind = plan.pop() if plan else self.rng.choices(KINDS, WEIGHTS)[0]
            self.kill(kind)
            self.log(f"  {time.time() - t0:6.1f} s  kill {kind}")
        self.report.seconds = time.time() - t0
        self._finish()
        return self.report

    def _finish(self) -> None:
        import engine
        paths.append(os.path.join(self.d, "stop"), "")
        for kind, p in self.producers.items():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                self.report.problems.append(f"producer {kind} did not stop within 60 s")
                p.kill()
        self.log("  producers stopped; draining")
        with engine.Queue(self.db, **TUNING) as q:
            deadline = time.time() + 180
            while True:
                c = q.stats()["counts"]
                left = c["pending"] + c["delayed"] + c["running"] + c["waiting"]
                if not left:
                    break
                if time.time() > deadline:
                    self.report.problems.append(f"{left} tasks still live 180 s after the producers stopped")
                    break
                time.sleep(0.2)
            self.sup.send_signal(signal.SIGTERM)
            try:
                self.sup.wait(60)
            except subprocess.TimeoutExpired:
                self.report.problems.append("the worker supervisor did not drain within 60 s of SIGTERM")
                self.sup.kill()
            try:
                self.report.live_checked = q.verify()
            except engine.errors.EngineError as e:
                self.report.problems.append(f"verify: {e}")
            self._check(q)

    def _check(self, q) -> None:
        from . import protocol
        from .api import loads
        from .shm import COMPLETED
        r = self.report
        tried: Set[str] = set()
        acked: Dict[str, int] = {}
        for kind in ("single", "batch"):
            path = os.path.join(self.d, f"producer-{kind}.log")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == "try":
                        tried.add(parts[1])
                    elif len(parts) == 3 and parts[0] == "ack":
                        acked[parts[1]] = int(parts[2])
        runs: Dict[str, List[float]] = collections.defaultdict(list)
        path = os.path.join(self.d, "runs.log")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 4 and parts[0] == "run":
                        runs[parts[1]].append(float(parts[3]))
        stored: Dict[str, int] = {}
        dup: List[str] = []
        for tid, ser, body in q.reader.conn.execute(
                "SELECT t.id, t.ser, p.body FROM tasks t JOIN payloads p ON p.id = t.id"):
            tok = loads(ser, body)[0][0]
            if tok in stored:
                dup.append(tok)
            stored[tok] = tid
        states = q.reader.last_states(list(stored.values()))
        q._command("sync", ([],))  # a turn of the writer's: it writes the submit events it holds first
        events: Dict[int, int] = collections.Counter()
        for first, n in q.reader.conn.execute("SELECT id, n FROM events WHERE kind IN (?, ?)",
                                              (protocol.EV_SUBMITTED, protocol.EV_BATCH_SUBMITTED)):
            events.update(range(first, first + n))
        r.tried, r.acked, r.stored = len(tried), len(acked), len(stored)
        r.runs = sum(map(len, runs.values()))

        def problem(what: str, items: List[str]) -> None:
            if items:
                r.problems.append(f"{len(items)} {what}, e.g. {sorted(items)[:3]}")
        problem("tokens stored twice", dup)
        problem("acknowledged tasks not stored under the id their submit returned",
                [t for t, tid in acked.items() if stored.get(t) != tid])
        problem("stored tasks not completed", [t for t, tid in stored.items() if states.get(tid) != COMPLETED])
        problem("acknowledged tasks that never ran", [t for t in acked if t not in runs])
        problem("tasks stored that were never submitted", [t for t in stored if t not in tried])
        problem("tasks ran that were never submitted", [t for t in runs if t not in tried])
        problem("stored tasks with no submit event", [t for t, tid in stored.items() if not events[tid]])
        problem("stored tasks with more than one submit event", [t for t, tid in stored.items() if events[tid] > 1])
        kills = self.kill_times
        unjustified = []
        for tok, times in runs.items():
            times.sort()
            r.reruns += len(times) - 1
            for a, b in zip(times, times[1:]):
                if not any(k0 <= b and a <= k1 for k0, k1 in kills):
                    unjustified.append(tok)
        problem("tasks ran twice with no kill between the runs", unjustified)


def run(seconds: float, workers: int = 2, seed: Optional[int] = None, directory: Optional[str] = None,
        keep: bool = False, log=print) -> Report:
    """Run the chaos harness for `seconds`; returns its report."""
    seed = random.randrange(1 << 30) if seed is None else seed
    d = os.path.abspath(directory or tempfile.mkdtemp(prefix="headrace-chaos-"))
    os.makedirs(d, exist_ok=True)
    log(f"headrace chaos: {seconds:.0f} s, {workers} workers, seed {seed}, in {d}")
    try:
        report = Harness(d, workers, seed, log).run(seconds)
    finally:
        # Whatever happened, leave no process behind.
        import psutil
        for p in psutil.Process().children(recursive=True):
            try:
                p.kill()
            except psutil.Error:
                pass
    if report.ok:
        _cleanup(d, files=not keep and directory is None)
    else:
        log(f"kept {d} for inspection")
    return report


def _cleanup(d: str, files: bool) -> None:
    """Unlink the run's segment once its writer is gone; and its files."""
    from .shm import Segment
    db = os.path.join(d, "q.db")
    deadline = time.time() + 10
    while os.path.exists(db) and paths.writer_alive(db) and time.time() < deadline:
        time.sleep(0.05)
    if os.path.exists(db):
        Segment.unlink(paths.segment_name(db))
    if files:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="headrace chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=None, help="how long to kill things (default 60)")
    ap.add_argument("--minutes", type=float, default=None, help="the same, in minutes")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", default=None, help="work here (kept) instead of a temporary directory")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--role", choices=("producer", "workers"), help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--inc", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.role == "producer":
        _producer(a.dir, a.kind, a.inc, a.seed or 0)
        return 0
    if a.role == "workers":
        return _workers(a.dir, a.workers)
    seconds = a.seconds if a.seconds is not None else (a.minutes * 60 if a.minutes is not None else 60.0)
    report = run(seconds, a.workers, a.seed, a.dir)
    print(report.summary())
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**report.__dict__, "cycles": report.cycles, "ok": report.ok}, f, indent=1)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
