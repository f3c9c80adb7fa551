"""Fixtures and helpers for the native-core benchmarks (pytest-benchmark).

Every benchmark works on its own shared-memory segment, named
``bench-<tag>-<pid>-<counter>``; the fixture closes and unlinks it at
teardown and checks the segment's invariants (``Segment.verify``) first, so a
benchmark of a broken structure fails instead of reporting a number.

Rates: one benchmark round does many items, so each test records
``items_per_round`` and ``items_per_s`` (= items_per_round / median round
time) in ``benchmark.extra_info``; the terminal summary prints them.
"""
from __future__ import annotations

import array
import itertools
import os
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

# HEADRACE_BENCH_ROOT=<dir> runs the same benchmarks against another
# checkout/build of the package (for example a pristine build of a commit
# while the working tree is mid-edit); otherwise the installed package is used.
if os.environ.get("HEADRACE_BENCH_ROOT"):
    sys.path.insert(0, str(Path(os.environ["HEADRACE_BENCH_ROOT"]).resolve()))

from engine._core import ffi  # noqa: E402
from engine.shm import COMPLETED, PENDING, Segment, now_us  # noqa: E402

#: Live-entry counts every single-process benchmark runs at.
SIZES = [1_000, 100_000, 1_000_000]
SIZE_IDS = ["1k", "100k", "1M"]
#: Slots beyond the live count: room for one round's pushes before the
#: next setup frees them.
HEADROOM = 4096
#: Lease far enough out that nothing expires during a run.
LEASE_S = 600

_counter = itertools.count()
_RESULTS: List[Dict[str, Any]] = []

_TASK_SIZE = ffi.sizeof("hr_task")
_OFF_ID = ffi.offsetof("hr_task", "id")
_OFF_PRIO = ffi.offsetof("hr_task", "prio")
_OFF_STATE = ffi.offsetof("hr_task", "state")
assert _TASK_SIZE % 8 == 0 and _OFF_ID == 0


def lease_until() -> int:
    return now_us() + LEASE_S * 1_000_000


def seg_name(tag: str) -> str:
    """A segment name unique to this process and call."""
    return f"bench-{tag}-{os.getpid()}-{next(_counter)}"


class Queue:
    """A benchmark segment plus the bookkeeping to keep its live count fixed.

    Tasks get fresh ids (never reused within a segment), a uniformly random
    priority in 0..255 and an auto-assigned sequence number, so ready-heap
    keys are all distinct.
    """

    def __init__(self, name: str, live: int, capacity: Optional[int] = None) -> None:
        self.name = name
        self.live = live
        self.seg = Segment.create(name, capacity or live + HEADROOM)
        self.rng = random.Random(live)
        self.next_id = 1
        self._recs = Segment.dirty_records(4096)
        self.top_up(live)

    # -- building tasks without per-item Python attribute sets -------------

    def tasks(self, n: int, out: Any = None) -> Any:
        """Fill an ``hr_task[n]`` with fresh ids and random priorities."""
        out = Segment.tasks(n) if out is None else out
        mv = memoryview(ffi.buffer(out, n * _TASK_SIZE)).cast("B")
        mv[:] = bytes(n * _TASK_SIZE)  # zero: seq 0 = auto, no dedup, run_at 0
        mv.cast("Q")[0::_TASK_SIZE // 8] = array.array("Q", range(self.next_id, self.next_id + n))
        mv[_OFF_PRIO::_TASK_SIZE] = self.rng.randbytes(n)
        mv[_OFF_STATE::_TASK_SIZE] = bytes([PENDING]) * n
        self.next_id += n
        return out

    def push_new(self, n: int) -> range:
        """Insert n fresh pending tasks (untimed helper); returns their ids."""
        first = self.next_id
        if n > 0:
            t = self.tasks(n)
            _, ok = self.seg.push_batch(t, n)
            assert ok == n, f"inserted {ok} of {n}"
        return range(first, first + n)

    # -- restoring the steady state between rounds --------------------------

    def drain(self) -> int:
        """Consume the whole dirty ring (what the flusher would do); returns slots freed."""
        freed = 0
        while True:
            _, n, epoch = self.seg.peek_dirty(len(self._recs), out=self._recs)
            if n == 0:
                return freed
            freed += self.seg.advance_dirty(n, epoch)

    def pending(self) -> int:
        return self.seg.info()["counts"]["pending"]

    def top_up(self, target: Optional[int] = None) -> int:
        """Free terminal slots, then push fresh tasks until `target` are pending."""
        target = self.live if target is None else target
        self.drain()
        missing = target - self.pending()
        self.push_new(missing)
        return missing

    def complete(self, tickets: Any, n: int) -> None:
        if n:
            _, ok = self.seg.finish_batch(tickets, n, COMPLETED)
            assert ok == n

    def close(self, verify: bool = True) -> None:
        try:
            if verify and self.seg._mm is not None:
                self.seg.verify()
        finally:
            self.seg.close()
            Segment.unlink(self.name)


@pytest.fixture
def make_queue(request: pytest.FixtureRequest):
    """Factory: ``make_queue(live)`` -> a prefilled :class:`Queue`; all are unlinked at teardown."""
    made: List[Queue] = []
    tag = request.node.originalname.replace("test_", "")[:40]

    def make(live: int, capacity: Optional[int] = None) -> Queue:
        q = Queue(seg_name(tag), live, capacity)
        made.append(q)
        return q

    yield make
    errors = []
    for q in made:
        try:
            q.close()  # verifies, then unlinks whatever happens
        except Exception as e:  # keep closing the others
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def record(benchmark, request: pytest.FixtureRequest):
    """``record(items_per_round, live, **extra)`` after ``benchmark.pedantic``.

    Stores items/s computed from the median round in ``benchmark.extra_info``.
    """

    def rec(items_per_round: int, live: int, **extra: Any) -> Optional[float]:
        benchmark.extra_info["items_per_round"] = items_per_round
        benchmark.extra_info["live"] = live
        benchmark.extra_info.update(extra)
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return None
        median = stats.stats.median
        rate = items_per_round / median if median > 0 else float("inf")
        benchmark.extra_info["items_per_s"] = rate
        _RESULTS.append({
            "group": benchmark.group or "",
            "name": request.node.name,
            "live": live,
            "items": items_per_round,
            "median": median,
            "rounds": len(stats.stats.data),
            "items_per_s": rate,
            "extra": {k: v for k, v in extra.items()},
        })
        return rate

    return rec


def _core_self_check() -> str:
    """Pop order and invariants on a small random segment: numbers from a
    core whose heap is broken are meaningless, so say so up front."""
    name = seg_name("selfcheck")
    q = Queue(name, 5000, capacity=5000)
    try:
        keys = []
        lease = lease_until()
        while True:
            t = q.seg.pop(lease)
            if t is None:
                break
            s = q.seg.read_slot(t.slot)
            keys.append((255 - s.prio, s.seq))
        q.seg.verify()
        if len(keys) != 5000 or keys != sorted(keys):
            return f"FAILED: {sum(a > b for a, b in zip(keys, keys[1:]))} pops out of priority/FIFO order"
        return "ok"
    except Exception as e:
        return f"FAILED: {e}"
    finally:
        q.close(verify=False)


def _core_id() -> str:
    import hashlib
    import engine._core as core
    with open(core.__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return f"{core.__file__} (sha256 {digest})"


_SESSION: Dict[str, str] = {}


def pytest_collection_modifyitems(config, items) -> None:
    """The `slow` cases (1M and 10M backlogs) run only when asked for with ``-m slow``."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session) -> None:
    _SESSION["core"] = _core_id()
    _SESSION["self_check"] = _core_self_check()


def _fmt_rate(r: float) -> str:
    if r >= 1e6:
        return f"{r / 1e6:7.2f} M/s"
    return f"{r / 1e3:7.1f} k/s"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("headrace core: items per second (median round)")
    tr.write_line(f"core: {_SESSION.get('core')}")
    check = _SESSION.get("self_check", "?")
    tr.write_line(f"core self-check (pop order + verify): {check}",
                  **({"red": True, "bold": True} if check != "ok" else {}))
    tr.write_line(f"{'benchmark':52} {'live':>9} {'items/rnd':>9} {'median':>11} {'rate':>12}  notes")
    for r in sorted(_RESULTS, key=lambda r: (r["group"], r["live"], r["name"])):
        notes = ", ".join(f"{k}={v}" for k, v in r["extra"].items()
                          if k in ("worker_items_per_s", "worker_wall_min_over_max", "worker_cpu_busy",
                                   "lock_spins_won", "lock_sleeps"))
        tr.write_line(f"{r['name'][:52]:52} {r['live']:>9,} {r['items']:>9,} "
                      f"{r['median'] * 1e3:>8.3f} ms {_fmt_rate(r['items_per_s']):>12}  {notes}")
