"""`headrace demo`: a real pipeline on the embedded default.

A producer submits N tasks in batches while P worker processes hash each
payload.  It prints live progress, then throughput, latency percentiles and
a check that every submitted task completed.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, TextIO, Tuple

from .api import Queue

#: Name of the demo's task function.
TASK_NAME = "headrace.demo.digest"

_lat_fd: Dict[int, int] = {}
_lat_dir = ""


def digest(index: int, data: str, rounds: int, t0: float) -> str:
    """Hash `data` `rounds` times; records (index, enqueue, start, end) for the summary."""
    start = time.time()
    h = data.encode()
    for _ in range(rounds):
        h = hashlib.blake2b(h).digest()
    end = time.time()
    pid = os.getpid()
    fd = _lat_fd.get(pid)
    if fd is None:
        fd = _lat_fd[pid] = os.open(os.path.join(_lat_dir, f"{pid}.lat"),
                                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, f"{index} {t0:.6f} {start:.6f} {end:.6f}\n".encode())
    return h.hex()


def _pct(xs: List[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def run(tasks: int = 200_000, processes: int = 2, path: Optional[str] = None, batch: int = 1000,
        rounds: int = 20, out: TextIO = sys.stdout) -> int:
    """Run the demo; returns 0 when every submitted task completed exactly as checked."""
    global _lat_dir
    own_dir = path is None
    work = tempfile.mkdtemp(prefix="headrace-demo-")
    db = path or os.path.join(work, "demo.db")
    _lat_dir = os.path.join(work, "lat")
    os.makedirs(_lat_dir)
    tty = out.isatty()
    print(f"headrace demo: {tasks:,} tasks in batches of {batch:,}, {processes} worker processes, "
          f"database {db}", file=out)
    q = Queue(db)
    q.task(name=TASK_NAME)(digest)
    base = q.reader.counters().get("completed", 0)
    ctx = multiprocessing.get_context("fork")
    sup = ctx.Process(target=q.run_workers, args=(processes,), name="headrace-workers")
    sup.start()
    submitted = 0
    t_start = time.time()
    stop_progress = threading.Event()

    def progress() -> None:
        last_done, last_t = 0, time.time()
        while not stop_progress.wait(0.5):
            s = q.stats()
            c = s["counts"]
            done = c["completed"] - base
            now = time.time()
            rate = (done - last_done) / (now - last_t)
            last_done, last_t = done, now
            line = (f"  submitted {submitted:>9,}  pending {c['pending']:>9,}  running {c['running']:>4,}  "
                    f"done {done:>9,}  {rate:>10,.0f} tasks/s")
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=out, flush=True)
    th = threading.Thread(target=progress, daemon=True)
    th.start()
    try:
        for lo in range(0, tasks, batch):
            t0 = time.time()
            jobs = [q.tasks[TASK_NAME].job(i, f"payload-{i:09d}-" + "x" * 64, rounds, t0)
                    for i in range(lo, min(tasks, lo + batch))]
            res = q.submit_batch(jobs)
            submitted += len(res.inserted)
        t_submitted = time.time()
        while q.reader.counters().get("completed", 0) - base < submitted:
            if not sup.is_alive():
                print("\nheadrace demo: the worker supervisor died", file=out)
                return 1
            time.sleep(0.05)
        t_done = time.time()
    finally:
        stop_progress.set()
        th.join()
        if sup.is_alive():
            os.kill(sup.pid, signal.SIGTERM)
        sup.join(60)
    if tty:
        print(file=out)
    runs: List[Tuple[int, float, float, float]] = []
    for f in os.listdir(_lat_dir):
        with open(os.path.join(_lat_dir, f)) as fh:
            for line in fh:
                i, a, b, c = line.split()
                runs.append((int(i), float(a), float(b), float(c)))
    distinct = len({r[0] for r in runs})
    completed = q.reader.counters().get("completed", 0) - base
    lost = submitted - distinct
    elapsed = t_done - t_start
    starts = [r[2] - r[1] for r in runs]
    dones = [r[3] - r[1] for r in runs]
    print("summary:", file=out)
    print(f"  throughput        {submitted / elapsed:,.0f} tasks/s end to end "
          f"({submitted:,} tasks in {elapsed:.2f} s; submitting took {t_submitted - t_start:.2f} s, "
          f"{submitted / max(1e-9, t_submitted - t_start):,.0f} tasks/s)", file=out)
    print(f"  enqueue -> start  p50 {_fmt_ms(_pct(starts, 50))}  p99 {_fmt_ms(_pct(starts, 99))}", file=out)
    print(f"  enqueue -> done   p50 {_fmt_ms(_pct(dones, 50))}  p99 {_fmt_ms(_pct(dones, 99))}", file=out)
    ok = lost == 0 and completed == submitted
    print(f"  verification      submitted {submitted:,}, completed {completed:,}, lost {lost}, "
          f"re-runs {len(runs) - distinct} -> {'OK' if ok else 'FAILED'}", file=out)
    q.close()
    if own_dir:
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(_lat_dir, ignore_errors=True)
    return 0 if ok else 1
