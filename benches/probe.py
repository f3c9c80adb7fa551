#!/usr/bin/env python3
"""Quick probes of one engine path each, and A/B runs of two checkouts.

    python benches/probe.py single 20000 [--producers 4]   # one-by-one submits: tasks/s, the writer's
                                                            # CPU per task (1 producer: and the producer's,
                                                            # the WAL's largest size, in MB, and the
                                                            # submit's p99.9 and longest latency, in ms)
    python benches/probe.py batch 100000                    # submit_batch of 1,000: tasks/s, the
                                                            # producer's and the writer's CPU per task
    python benches/probe.py drain 40000                     # 2 workers drain a preload: tasks/s,
                                                            # workers' and writer's CPU per task
    python benches/probe.py e2e 8000                        # 1 producer one by one, 2 workers: tasks/s, p50,
                                                            # p99, CPU per task, and each submit's own
                                                            # p50, p99 and mean (us)
    python benches/probe.py claim 32000                     # one worker's parts, in process, per task:
                                                            # heap pops and tickets, the payloads' SQL
                                                            # read, their decode, finishing (us), and
                                                            # the whole claim and the run of a job
    python benches/probe.py ab OLD NEW --runs 5 -- drain 40000

`ab` runs the probe alternately against two checkouts (each with its C
extension built in place: ``python setup.py build_ext --inplace``), so that
both see the same machine, and prints each run then the medians.  On a
shared VM whose speed drifts by 20-50% over minutes, that is the only
comparison worth quoting.  Every probe works in a fresh temporary directory
with the default settings (a real database, synchronous=NORMAL).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from typing import Dict, List

TASK = "bench.noop"
FILLER = "abcdefghij" * 8


def _payload(i: int) -> dict:
    return {"i": i, "t": time.time(), "s": FILLER}


def _queue(d: str):
    import engine
    return engine.Queue(os.path.join(d, "q.db"))


def _producer(d: str, n: int, out) -> None:
    q = _queue(d)
    q.submit(TASK, args=(_payload(-1),))
    out.put(None)
    t0 = time.perf_counter()
    for i in range(n):
        q.submit(TASK, args=(_payload(i),))
    out.put(time.perf_counter() - t0)
    q.close()


def probe_single(d: str, n: int, producers: int) -> Dict[str, float]:
    q = _queue(d)
    wal = 0
    cpu: Dict[str, float] = {}
    w0 = _writer_cpu(d)
    if producers == 1:
        took = array("d", bytes(8 * n))
        clock = time.perf_counter
        c0, t0 = time.process_time(), clock()
        for i in range(n):
            s0 = clock()
            q.submit(TASK, args=(_payload(i),))
            took[i] = clock() - s0
            if i % 500 == 0:  # how far the WAL grows between the writer's checkpoints
                wal = max(wal, os.path.getsize(q.path + "-wal"))
        seconds = clock() - t0
        cpu["producer_cpu_us"] = (time.process_time() - c0) / n * 1e6
        ranked = sorted(took)  # the slowest submits wait out a checkpoint, if one holds the writer up
        cpu["p999_ms"] = ranked[min(n - 1, int(n * 0.999))] * 1e3
        cpu["max_ms"] = ranked[-1] * 1e3
    else:
        out = mp.get_context("fork").Queue()
        ps = [mp.get_context("fork").Process(target=_producer, args=(d, n // producers, out))
              for _ in range(producers)]
        for p in ps:
            p.start()
        for _ in ps:
            out.get()
        seconds = max(out.get() for _ in ps)
        for p in ps:
            p.join()
    cpu["writer_cpu_us"] = (_writer_cpu(d) - w0) / n * 1e6
    q.close()
    return {"tasks_s": n / seconds, "wal_max_mb": wal / 1e6, **cpu}


def probe_batch(d: str, n: int) -> Dict[str, float]:
    import engine
    q = _queue(d)
    q.submit(TASK, args=(_payload(-1),))  # the writer is up
    w0 = _writer_cpu(d)
    c0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, n, 1000):
        q.submit_batch([engine.Job(TASK, args=(_payload(i),)) for i in range(start, min(n, start + 1000))])
    seconds = time.perf_counter() - t0
    cpu = {"producer_cpu_us": (time.process_time() - c0) / n * 1e6, "writer_cpu_us": (_writer_cpu(d) - w0) / n * 1e6}
    q.close()
    return {"tasks_s": n / seconds, **cpu}


def _workers(d: str, rec: str, ready_fd: int) -> None:
    """Run 2 worker processes recording `index enqueued done` per task; on
    SIGTERM, write their CPU time and exit."""
    import resource
    q = _queue(d)
    fds: Dict[int, int] = {}

    @q.task(name=TASK)
    def noop(p: dict) -> None:
        fd = fds.get(os.getpid())
        if fd is None:
            fd = fds[os.getpid()] = os.open(os.path.join(rec, str(os.getpid())),
                                            os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, b"%d %.6f %.6f\n" % (p["i"], p["t"], time.time()))
    os.write(ready_fd, b"x")
    q.run_workers(processes=2)
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(d, "workers.cpu"), "w") as f:
        f.write(str(r.ru_utime + r.ru_stime))
    os._exit(0)


class _Records:
    """The workers' `index enqueued done` lines, read as the files grow
    (re-reading them whole every 10 ms took a core from the workers)."""

    def __init__(self, rec: str) -> None:
        self.rec = rec
        self.sizes: Dict[str, int] = {}
        self.rows: List[List[float]] = []

    def read(self) -> int:
        """Parse what was added since the last call; returns the rows so far."""
        for name in os.listdir(self.rec):
            with open(os.path.join(self.rec, name), "rb") as f:
                f.seek(self.sizes.get(name, 0))
                data = f.read()
            cut = data.rfind(b"\n") + 1  # a line being written waits for the next call
            self.sizes[name] = self.sizes.get(name, 0) + cut
            for line in data[:cut].split(b"\n"):
                parts = line.split()
                if len(parts) == 3:
                    self.rows.append([float(x) for x in parts])
        return len(self.rows)


def _writer_cpu(d: str) -> float:
    with open(os.path.join(d, "q.db.lock")) as f:
        pid = int(f.read().strip())
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _with_workers(d: str, n: int, produce=None) -> Dict[str, float]:
    """Start 2 workers, then call `produce()` (which returns its start time),
    wait until `n` tasks completed, stop the workers; the rate counts from
    that start, or (no `produce`: the tasks are there already) from the
    workers' start."""
    rec = os.path.join(d, "rec")
    os.mkdir(rec)
    r, w = os.pipe()
    w0, t0 = _writer_cpu(d), time.time()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _workers(d, rec, w)
    os.read(r, 1)
    if produce is not None:
        time.sleep(0.3)
        w0 = _writer_cpu(d)
        t0 = produce()
    records = _Records(rec)
    while records.read() < n:
        time.sleep(0.01)
    w1 = _writer_cpu(d)
    rows = records.rows
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    with open(os.path.join(d, "workers.cpu")) as f:
        workers_cpu = float(f.read())
    lat = sorted(done - enq for _, enq, done in rows)
    last = max(done for _, _, done in rows)
    return {"tasks_s": n / (last - t0), "p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
            "workers_cpu_us": workers_cpu / n * 1e6, "writer_cpu_us": (w1 - w0) / n * 1e6}


def probe_drain(d: str, n: int) -> Dict[str, float]:
    import engine
    q = _queue(d)
    for start in range(0, n, 1000):
        q.submit_batch([engine.Job(TASK, args=(_payload(i),)) for i in range(start, min(n, start + 1000))])
    res = _with_workers(d, n)
    q.close()
    return {k: v for k, v in res.items() if not k.startswith("p")}


def probe_e2e(d: str, n: int) -> Dict[str, float]:
    q = _queue(d)
    took: List[float] = []

    def produce() -> float:
        t0 = time.time()
        clock = time.perf_counter
        for i in range(n):
            a = clock()
            q.submit(TASK, args=(_payload(i),))
            took.append(clock() - a)
        return t0
    res = _with_workers(d, n, produce)
    q.close()
    # Each submit's own wait: the mean against the median shows what the slow few cost.
    took.sort()
    return {**res, "submit_p50_us": took[n // 2] * 1e6, "submit_p99_us": took[int(n * 0.99)] * 1e6,
            "submit_mean_us": sum(took) / n * 1e6}


def probe_claim(d: str, n: int) -> Dict[str, float]:
    """A worker's parts, timed in this process against a preloaded queue
    (the writer runs as usual): first the pieces of a claim of 32 one by
    one, then the worker's own claim and run of each job."""
    import engine
    from engine import shm, workers
    from engine.api import loads
    q = _queue(d)
    q.task(name=TASK)(lambda p: None)

    def preload() -> None:
        for start in range(0, n, 1000):
            q.submit_batch([engine.Job(TASK, args=(_payload(i),)) for i in range(start, min(n, start + 1000))])
    parts = dict.fromkeys(("pop_us", "tickets_us", "sql_us", "decode_us", "finish_us", "claim_us", "run_us"), 0.0)
    preload()
    seg, buf, done = q.seg, shm.Segment.tickets(32), 0
    while done < n:
        t0 = time.perf_counter()
        _, got = seg.pop_batch(32, shm.now_us() + 60_000_000, buf, start=False)
        t1 = time.perf_counter()
        tickets = shm.unpack_tickets(buf, got)
        t2 = time.perf_counter()
        rows = q.reader.jobs([t.id for t in tickets])
        t3 = time.perf_counter()
        for t in tickets:
            r = rows[t.id]
            loads(r[1], r[3])
        t4 = time.perf_counter()
        for t in tickets:
            seg.finish(t, shm.COMPLETED)
        t5 = time.perf_counter()
        for key, a, b in (("pop_us", t0, t1), ("tickets_us", t1, t2), ("sql_us", t2, t3), ("decode_us", t3, t4),
                          ("finish_us", t4, t5)):
            parts[key] += b - a
        done += got
    preload()
    done = 0
    while done < n:
        t0 = time.perf_counter()
        jobs = workers._claim(q, 32, 5.0, False)
        t1 = time.perf_counter()
        for job in jobs:
            workers.execute(q, job)
        parts["claim_us"] += t1 - t0
        parts["run_us"] += time.perf_counter() - t1
        done += len(jobs)
    q.close()
    return {k: v / n * 1e6 for k, v in parts.items()}


def run_probe(args: argparse.Namespace) -> Dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="probe-") as d:
        if args.probe == "single":
            return probe_single(d, args.n, args.producers)
        if args.probe == "batch":
            return probe_batch(d, args.n)
        if args.probe == "drain":
            return probe_drain(d, args.n)
        if args.probe == "claim":
            return probe_claim(d, args.n)
        return probe_e2e(d, args.n)


def ab(old: str, new: str, runs: int, probe: List[str]) -> int:
    results: Dict[str, List[Dict[str, float]]] = {"old": [], "new": []}
    for k in range(runs):
        for label, tree in (("old", old), ("new", new)):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            p = subprocess.run([sys.executable, os.path.abspath(__file__), *probe, "--json"], env=env,
                               cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=600)
            if p.returncode:
                print(p.stderr, file=sys.stderr)
                return p.returncode
            res = json.loads(p.stdout.strip().splitlines()[-1])
            results[label].append(res)
            print(f"run {k + 1} {label}: " + ", ".join(f"{key} {v:,.2f}" for key, v in res.items()), flush=True)
    for label in ("old", "new"):
        keys = results[label][0]
        print(f"median {label}: " + ", ".join(
            f"{key} {statistics.median(r[key] for r in results[label]):,.2f}" for key in keys))
    return 0


def main(argv: List[str]) -> int:
    if argv and argv[0] == "ab":
        if "--" not in argv:
            raise SystemExit("usage: probe.py ab OLD NEW [--runs N] -- PROBE ARGS...")
        cut = argv.index("--")
        ap = argparse.ArgumentParser(prog="probe.py ab")
        ap.add_argument("old")
        ap.add_argument("new")
        ap.add_argument("--runs", type=int, default=3)
        a = ap.parse_args(argv[1:cut])
        return ab(a.old, a.new, a.runs, argv[cut + 1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probe", choices=("single", "batch", "drain", "e2e", "claim"))
    ap.add_argument("n", type=int, nargs="?", default=20000)
    ap.add_argument("--producers", type=int, default=1, help="single: producer processes")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args(argv)
    res = run_probe(args)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.probe} {args.n}: " + ", ".join(f"{k} {v:,.2f}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
