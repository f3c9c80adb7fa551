"""Benchmarks of the lifecycle features, named like taskmill's cases so the
figures can be set side by side.  Each runs against a real writer process and
an on-disk database (WAL, synchronous=NORMAL).  "Dispatch" is the low-level
loop a pipeline drives itself: ``q.claim`` then ``job.complete`` / ``job.fail``
in this process, which leaves out the cost of running task functions.

    pytest benches/test_lifecycle.py --benchmark-only
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Iterator

import pytest

import engine
from engine import Backoff

PAYLOAD = "x" * 80


@pytest.fixture
def queue() -> Iterator[engine.Queue]:
    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as d:
        q = engine.Queue(os.path.join(d, "q.db"), lease=600.0)
        q.task(name="bench.noop")(lambda *a: None)
        yield q
        q.close()


def _dispatch_all(q: engine.Queue, n: int, fail: bool = False, timeout: float = 120) -> None:
    """Claim and settle until `n` tasks ended (completed, or dead when `fail`)."""
    ended = 0
    deadline = time.monotonic() + timeout
    err = RuntimeError("bench failure")
    while ended < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {ended} of {n} ended: {q.stats()}")
        for job in q.claim(max=64, timeout=0.5):
            if fail:
                job.fail(err)
                if job.attempt >= job.max_attempts:
                    ended += 1
            else:
                job.complete()
                ended += 1


@pytest.mark.benchmark(group="lifecycle-groups")
@pytest.mark.parametrize("groups", [1, 10, 50, 100])
def test_dispatch_group_scaling(benchmark, queue, record, groups):
    """1,000 tasks spread over `groups` groups, each limited to 4 at a time."""
    n = 1000
    for g in range(groups):
        queue.set_group_limit(f"g{g}", 4)

    def setup():
        queue.submit_batch([engine.Job("bench.noop", args=(i, PAYLOAD), group=f"g{i % groups}") for i in range(n)])
        return (), {}
    benchmark.pedantic(lambda: _dispatch_all(queue, n), setup=setup, rounds=5)
    record(n, 0, groups=groups)


@pytest.mark.benchmark(group="lifecycle-deps")
@pytest.mark.parametrize("length", [10, 25, 50])
def test_dep_chain_dispatch(benchmark, queue, record, length):
    """A chain of `length` tasks, each waiting for the one before."""
    def setup():
        ids = [queue.submit("bench.noop", args=(0, PAYLOAD))]
        for i in range(1, length):
            ids.append(queue.submit("bench.noop", args=(i, PAYLOAD), depends_on=[ids[-1]]))
        return (), {}
    benchmark.pedantic(lambda: _dispatch_all(queue, length), setup=setup, rounds=5)
    record(length, 0, length=length)


@pytest.mark.benchmark(group="lifecycle-deps")
@pytest.mark.parametrize("parents", [10, 50, 100])
def test_dep_fan_in_dispatch(benchmark, queue, record, parents):
    """`parents` tasks and one that waits for all of them."""
    def setup():
        ids = queue.submit_batch([engine.Job("bench.noop", args=(i, PAYLOAD)) for i in range(parents)]).inserted
        queue.submit("bench.noop", args=(-1, PAYLOAD), depends_on=ids)
        return (), {}
    benchmark.pedantic(lambda: _dispatch_all(queue, parents + 1), setup=setup, rounds=5)
    record(parents + 1, 0, parents=parents)


BACKOFFS = {
    "constant": Backoff.constant(0.001),
    "linear": Backoff.linear(0.001, cap=0.005),
    "exponential": Backoff.exponential(0.001, cap=0.005),
    "exponential_jitter": Backoff.exponential(0.001, cap=0.005, jitter=True),
}


@pytest.mark.benchmark(group="lifecycle-retry")
@pytest.mark.parametrize("kind", list(BACKOFFS))
def test_retryable_dead_letter(benchmark, queue, record, kind):
    """100 tasks that fail every attempt (3 each, with `kind` backoff of ~1 ms) until dead."""
    n = 100
    queue.task(name=f"bench.fail_{kind}", max_attempts=3, backoff=BACKOFFS[kind])(lambda *a: None)

    def setup():
        queue.submit_batch([engine.Job(f"bench.fail_{kind}", args=(i, PAYLOAD)) for i in range(n)])
        return (), {}
    benchmark.pedantic(lambda: _dispatch_all(queue, n, fail=True), setup=setup, rounds=3)
    record(n, 0, attempts=3 * n)


@pytest.mark.benchmark(group="lifecycle-tags")
@pytest.mark.parametrize("tags", [0, 5, 10, 20])
def test_submit_with_tags(benchmark, queue, record, tags):
    """Batch submit of 1,000 tasks carrying `tags` tags each."""
    n = 1000
    jobs = [engine.Job("bench.noop", args=(i, PAYLOAD), tags={f"k{t}": f"v{i % 7}" for t in range(tags)} or None)
            for i in range(n)]
    benchmark.pedantic(lambda: queue.submit_batch(jobs), rounds=10, warmup_rounds=1)
    record(n, 0, tags=tags)


@pytest.mark.benchmark(group="lifecycle-priority")
def test_mixed_priority_dispatch_500(benchmark, queue, record):
    """500 tasks of random priorities, dispatched best first."""
    n = 500
    rnd = random.Random(7)

    def setup():
        queue.submit_batch([engine.Job("bench.noop", args=(i, PAYLOAD), priority=rnd.randrange(256))
                            for i in range(n)])
        return (), {}
    benchmark.pedantic(lambda: _dispatch_all(queue, n), setup=setup, rounds=5)
    record(n, 0)
