"""Benchmarks of the whole engine: a real writer process, an on-disk database
with the default durable settings (WAL, synchronous=NORMAL), real worker
processes.  Rates are in the summary table (items per second, median round).

    pytest benches/test_engine.py --benchmark-only
    pytest benches/test_engine.py --benchmark-only -m slow   # the 1M backlog
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Iterator, List

import pytest

import engine

PAYLOAD = "x" * 80  # ~100 bytes serialised, like the peer comparison
ROUNDS = 5


def _completed(q: engine.Queue) -> int:
    return q.stats()["counts"]["completed"]


@pytest.fixture
def queue() -> Iterator[engine.Queue]:
    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as d:
        q = engine.Queue(os.path.join(d, "q.db"))
        q.task(name="bench.noop")(_noop)
        yield q
        q.close()


def _noop(i: int, payload: str) -> None:
    pass


def _drained(q: engine.Queue, target: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while _completed(q) < target:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {_completed(q)} of {target} completed: {q.stats()}")
        time.sleep(0.002)


def _start_workers(q: engine.Queue, n: int) -> multiprocessing.Process:
    p = multiprocessing.get_context("fork").Process(target=q.run_workers, args=(n,))
    p.start()
    return p


def _stop(p: multiprocessing.Process) -> None:
    os.kill(p.pid, signal.SIGTERM)
    p.join(60)
    assert p.exitcode == 0


@pytest.mark.benchmark(group="engine-submit")
def test_submit_1000_tasks(benchmark, queue, record):
    """1,000 one-by-one durable submits (each returns once committed)."""
    n = 1000
    counter = iter(range(10**9))

    def run() -> None:
        for _ in range(n):
            queue.submit("bench.noop", args=(next(counter), PAYLOAD))
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    record(n, 0, per_call=1)


@pytest.mark.benchmark(group="engine-submit")
def test_batch_submit_1000(benchmark, queue, record):
    n = 1000

    def setup():
        return ([engine.Job("bench.noop", args=(i, PAYLOAD)) for i in range(n)],), {}

    def run(jobs: List[engine.Job]) -> None:
        out = queue.submit_batch(jobs)
        assert len(out.inserted) == n
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS * 4, warmup_rounds=1)
    record(n, 0, per_call=n)


_PRODUCER = textwrap.dedent('''
    import sys, time, engine
    q = engine.Queue(sys.argv[1])
    n = int(sys.argv[2])
    print("ready", flush=True)
    while sys.stdin.readline().strip() == "go":
        for i in range(n):
            q.submit("bench.noop", args=(i, "x" * 80))
        print("done", flush=True)
    q.close()
''')


@pytest.mark.benchmark(group="engine-submit")
def test_submit_single_4_producers(benchmark, queue, record):
    """Group commit: 4 processes submitting one by one share commits."""
    per = 500
    procs = [subprocess.Popen([sys.executable, "-c", _PRODUCER, queue.path, str(per)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"

        def run() -> None:
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            for p in procs:
                assert p.stdout.readline().strip() == "done"
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(60)
    record(4 * per, 0, per_call=1, producers=4)


def _drain_with_workers(benchmark, queue: engine.Queue, n: int, workers: int) -> None:
    """Each round: preload `n` tasks (untimed), then time `workers` worker
    processes started on them until all completed."""
    state = {}

    def setup():
        if "p" in state:  # the last round's workers
            _stop(state.pop("p"))
        base = _completed(queue)
        queue.submit_batch([engine.Job("bench.noop", args=(i, PAYLOAD)) for i in range(n)])
        state["target"] = base + n
        return (), {}

    def run() -> None:
        state["p"] = _start_workers(queue, workers)
        _drained(queue, state["target"])
    try:
        benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=0)
    finally:
        if "p" in state:
            _stop(state.pop("p"))


@pytest.mark.benchmark(group="engine-drain")
def test_drain_2_workers(benchmark, queue, record):
    """Preloaded tasks, drained by 2 worker processes running task functions."""
    n = 20_000
    _drain_with_workers(benchmark, queue, n, 2)
    record(n, n, workers=2)


@pytest.mark.benchmark(group="engine-e2e")
@pytest.mark.parametrize("batch", [1, 1000], ids=["single", "batch1000"])
def test_end_to_end_2_workers(benchmark, queue, record, batch):
    """1 producer submitting while 2 worker processes run the tasks."""
    n = 5000 if batch == 1 else 20_000
    p = _start_workers(queue, 2)
    try:
        def run() -> None:
            target = _completed(queue) + n
            if batch == 1:
                for i in range(n):
                    queue.submit("bench.noop", args=(i, PAYLOAD))
            else:
                for lo in range(0, n, batch):
                    queue.submit_batch([engine.Job("bench.noop", args=(i, PAYLOAD)) for i in range(lo, lo + batch)])
            _drained(queue, target)
        benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    finally:
        _stop(p)
    record(n, 0, workers=2, batch=batch)


def _claim_drain(q: engine.Queue, n: int) -> None:
    got = 0
    while got < n:
        jobs = q.claim(max=256, timeout=5)
        assert jobs, f"drained {got} of {n}"
        for j in jobs:
            j.complete()
        got += len(jobs)


@pytest.mark.benchmark(group="engine-backlog")
@pytest.mark.parametrize("backlog", [1_000, 100_000, pytest.param(1_000_000, marks=pytest.mark.slow),
                                     pytest.param(10_000_000, marks=pytest.mark.slow)],
                         ids=["1k", "100k", "1M", "10M"])
def test_backlog_drain(benchmark, queue, record, backlog):
    """Claim+complete through the public API until a preloaded backlog is
    empty: above the segment's capacity (65,536) the rest spills to SQLite."""
    def setup():
        for lo in range(0, backlog, 10_000):
            queue.submit_batch([engine.Job("bench.noop", args=(i, PAYLOAD))
                                for i in range(lo, min(backlog, lo + 10_000))])
        return (), {}

    benchmark.pedantic(lambda: _claim_drain(queue, backlog), setup=setup, rounds=3 if backlog < 10**6 else 1,
                       warmup_rounds=0)
    record(backlog, backlog, spilled_above=queue.stats()["capacity"])


# ---- more cases named like taskmill's ---------------------------------------------------


@pytest.mark.benchmark(group="engine-submit")
def test_submit_dedup_hit_1000(benchmark, queue, record):
    """1,000 one-by-one submits whose dedup key a live task holds (skip)."""
    n = 1000
    queue.submit("bench.noop", args=(0, PAYLOAD), dedup_key="the-one", delay=3600)

    def run() -> None:
        for i in range(n):
            queue.submit("bench.noop", args=(i, PAYLOAD), dedup_key="the-one", on_duplicate="skip")
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    assert queue.stats()["submitted"] <= 1 + n  # nothing new went in (the counter lags; never over)
    record(n, 1)


@pytest.mark.benchmark(group="engine-dispatch")
def test_dispatch_and_complete_1000(benchmark, queue, record):
    """Claim and complete 1,000 preloaded tasks through the public API, in this process."""
    n = 1000

    def setup():
        queue.submit_batch([engine.Job("bench.noop", args=(i, PAYLOAD)) for i in range(n)])
        return (), {}
    benchmark.pedantic(lambda: _claim_drain(queue, n), setup=setup, rounds=ROUNDS)
    record(n, n)


@pytest.mark.benchmark(group="engine-dispatch")
def test_dispatch_permanent_failure_500(benchmark, queue, record):
    """Claim 500 tasks and fail each for good (no retry): they end dead."""
    n = 500
    err = RuntimeError("permanent")

    def setup():
        queue.submit_batch([engine.Job("bench.noop", args=(i, PAYLOAD)) for i in range(n)])
        return (), {}

    def run() -> None:
        got = 0
        while got < n:
            jobs = queue.claim(max=256, timeout=5)
            assert jobs
            for j in jobs:
                j.fail(err, retry=False)
            got += len(jobs)
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    record(n, n)


@pytest.mark.benchmark(group="engine-peek")
@pytest.mark.parametrize("pending", [100, 1000, 5000])
def test_peek_next(benchmark, queue, record, pending):
    """Look at the task a claim would take next, with `pending` tasks queued."""
    queue.submit_batch([engine.Job("bench.noop", args=(i, PAYLOAD), priority=i % 7) for i in range(pending)])
    seg = queue.seg

    def run() -> None:
        for _ in range(1000):
            seg.peek_best()
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    record(1000, pending)


@pytest.mark.benchmark(group="engine-concurrency")
@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_concurrency_scaling(benchmark, queue, record, workers):
    """Drain 10,000 preloaded tasks with `workers` worker processes (on this
    2-core machine, more than 2 compete for the same cores)."""
    n = 10_000
    _drain_with_workers(benchmark, queue, n, workers)
    record(n, n, workers=workers)
