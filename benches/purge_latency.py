"""Does retention's purge stall submits or claims?

Finishes N tasks, then measures one-by-one submit latency and claim+complete
latency twice on the same queue: while the writer purges those N finished
tasks (retention of 1 ms), and after it is done.  Prints p50/p99/max of each.

    python benches/purge_latency.py [N]
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def measure(q: engine.Queue, n: int):
    sub, clm = [], []
    for i in range(n):
        t = time.perf_counter()
        q.submit("p.noop", args=(i,))
        sub.append(time.perf_counter() - t)
        t = time.perf_counter()
        for job in q.claim(max=1, timeout=5):
            job.complete()
        clm.append(time.perf_counter() - t)
    return sub, clm


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory(prefix="headrace-purge-") as d:
        with engine.Queue(os.path.join(d, "q.db"), retention=0.001, purge_interval=0.05, lease=600.0) as q:
            q.task(name="p.noop")(lambda i: None)
            for lo in range(0, n, 10_000):
                q.submit_batch([engine.Job("p.noop", args=(i,)) for i in range(lo, min(n, lo + 10_000))])
            done = 0
            while done < n:
                for job in q.claim(max=256, timeout=5):
                    job.complete()
                    done += 1
            def left():
                return q.reader.conn.execute("SELECT count(*) FROM tasks").fetchall()[0][0]
            start_left = left()
            t0 = time.monotonic()
            during = measure(q, 3000)
            purged_meanwhile = start_left - left()
            while left() > 10:
                time.sleep(0.1)
            purge_s = time.monotonic() - t0
            after = measure(q, 3000)
    print(f"purged {n:,} finished tasks in {purge_s:.1f} s; {purged_meanwhile:,} of them during the first window")
    for name, (sub, clm) in (("while purging", during), ("after", after)):
        print(f"{name:>14}: submit p50 {statistics.median(sub) * 1e6:.0f} us, p99 {_pct(sub, .99) * 1e6:.0f} us, "
              f"max {max(sub) * 1e3:.1f} ms | claim+complete p50 {statistics.median(clm) * 1e6:.0f} us, "
              f"p99 {_pct(clm, .99) * 1e6:.0f} us, max {max(clm) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
