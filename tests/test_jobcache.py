"""The job cache (csrc/jobcache.h): a stateful property test of the arena
against a pure-Python model, and the worker's use of it end to end."""
from __future__ import annotations

import itertools
import os
from typing import Dict, List, Tuple

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import engine
from engine import store
from engine.shm import Segment, lib

from helpers import model_settings, spawn

CAP = 8  # slots; the arena is CAP * HR_JC_PER_SLOT bytes
HEAD = 48  # sizeof(hr_jc_rec)
_names = itertools.count()


def _pad8(x: int) -> int:
    return (x + 7) & ~7


class ArenaModel:
    """Where each record goes and when it is overwritten, as jobcache.h says."""

    def __init__(self, cap: int) -> None:
        self.cap, self.head = cap, 0
        self.at: Dict[int, int] = {}  # ref -> position

    def put(self, name_len: int, body_len: int) -> int:
        length = HEAD + name_len + body_len
        if length > self.cap // 8:
            return 0
        pos = self.head
        if pos % self.cap + length > self.cap:
            pos += self.cap - pos % self.cap
        self.head = pos + _pad8(length)
        return pos + 1

    def intact(self, ref: int) -> bool:
        return ref != 0 and self.head <= ref - 1 + self.cap


class JobCacheModel(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.name = f"test-jc-{os.getpid()}-{next(_names)}"
        self.seg = Segment.create(self.name, CAP)
        self.model = ArenaModel(CAP * lib.HR_JC_PER_SLOT)
        self.live: Dict[int, Tuple[int, int, tuple]] = {}  # id -> (slot, ref, row)
        self.ids = itertools.count(1)

    def teardown(self) -> None:
        if hasattr(self, "seg"):
            self.seg.close()
            Segment.unlink(self.name)

    @rule(name=st.sampled_from(["a", "task.b", "ü" * 20]), body=st.binary(max_size=300),
          ser=st.integers(0, 1), max_attempts=st.integers(0, 9), timeout_ms=st.integers(0, 10**6))
    def place(self, name: str, body: bytes, ser: int, max_attempts: int, timeout_ms: int) -> None:
        """The writer caches a job and places it in a slot (the oldest live one goes first when full)."""
        if len(self.live) == CAP:
            old = min(self.live)
            self.seg.remove(old)
            del self.live[old]
            _, m, epoch = self.seg.peek_dirty(64)  # flushed, the cancelled task's slot is free
            self.seg.advance_dirty(m, epoch)
        tid, created = next(self.ids), 1_700_000_000_000_000 + len(body)
        nb = name.encode()
        ref = lib.hr_jc_put(self.seg._mem, tid, nb, len(nb), body, len(body), ser, created, max_attempts, timeout_ms)
        assert ref == self.model.put(len(nb), len(body))
        slot = self.seg.push(tid, aux=ref)
        self.live[tid] = (slot, ref, (name, ser, created, body, max_attempts, timeout_ms))

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        """A claim reads exactly the records that are still intact, each as it was written."""
        ids = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True) if self.live else st.just([]))
        foreign = data.draw(st.booleans())  # a ticket whose slot holds another task: never a hit
        tickets: List[Tuple[int, int]] = [(tid, self.live[tid][0]) for tid in ids]
        if foreign and self.live:
            tid = max(self.live)
            tickets.append((tid + 1000, self.live[tid][0]))
        buf = Segment.tickets(max(1, len(tickets)))
        for k, (tid, slot) in enumerate(tickets):
            buf[k].id, buf[k].slot, buf[k].attempt = tid, slot, 1
        got = {tid: row for (tid, _), row in zip(tickets, self.seg.cached_jobs(buf, len(tickets))) if row}
        want = {tid: self.live[tid][2] for tid in ids if self.model.intact(self.live[tid][1])}
        assert got == want

    @invariant()
    def structures_agree(self) -> None:
        if hasattr(self, "seg"):
            self.seg.verify()


TestJobCacheModel = JobCacheModel.TestCase
TestJobCacheModel.settings = model_settings(300, 100, 50)


def test_a_claim_of_a_full_buffer_reads_the_rest_as_misses(segname):
    """Records that do not fit the claim's copy are misses (read from the database), not errors."""
    seg = Segment.create(segname, 64)
    body = b"x" * 600  # under an eighth of the arena, over the copy's room per ticket (512)
    refs = [lib.hr_jc_put(seg._mem, tid, b"t", 1, body, len(body), 0, 0, 0, 0) for tid in (1, 2)]
    assert all(refs)
    slots = [seg.push(tid, aux=ref) for tid, ref in zip((1, 2), refs)]
    buf = Segment.tickets(2)
    for k, tid in enumerate((1, 2)):
        buf[k].id, buf[k].slot, buf[k].attempt = tid, slots[k], 1
    got = seg.cached_jobs(buf, 2)  # room for 2 * 512 bytes: the first record fits, the second does not
    assert got == [("t", 0, 0, body, 0, 0), None]
    seg.close()


def _count_reads(monkeypatch) -> List[int]:
    """Ids the worker read from the database."""
    read: List[int] = []
    real = store.Reader.jobs

    def jobs(self, ids):
        read.extend(ids)
        return real(self, ids)
    monkeypatch.setattr(store.Reader, "jobs", jobs)
    return read


def test_claimed_jobs_come_from_the_segment_without_reading_the_database(tmp_path, monkeypatch):
    q = engine.Queue(str(tmp_path / "q.db"))
    out = q.submit_batch([engine.Job("t.x", args=(i, "p" * i), kwargs={"k": [i]}) for i in range(50)])
    one = q.submit("t.y", args=("one",))  # one by one: the C turn's other path
    read = _count_reads(monkeypatch)
    jobs = []
    while len(jobs) < 51:
        jobs += q.claim(64, timeout=5)
    assert read == []
    assert sorted((j.name, j.args, j.kwargs) for j in jobs) == sorted(
        [("t.x", (i, "p" * i), {"k": [i]}) for i in range(50)] + [("t.y", ("one",), {})])
    assert {j.id for j in jobs} == set(out.inserted) | {one}
    for j in jobs:
        assert j.complete()
    q.close()


def test_a_spilled_backlog_is_refilled_with_its_jobs_in_the_cache(tmp_path, monkeypatch):
    """A backlog of 8x the segment's capacity: the writer refills the
    segment from the spill store and copies each job it places into the
    cache, so claiming workers read none of them from the database."""
    q = engine.Queue(str(tmp_path / "q.db"), capacity=128)
    for start in range(0, 1024, 256):
        q.submit_batch([engine.Job("t.s", args=(i,), priority=i % 3) for i in range(start, start + 256)])
    assert q.stats()["spilled"] > 0
    read = _count_reads(monkeypatch)
    got = []
    while len(got) < 1024:
        jobs = q.claim(64, timeout=5)
        got += [j.args[0] for j in jobs]
        for j in jobs:
            assert j.complete()
    assert sorted(got) == list(range(1024))
    # Every job was cached as it was placed: by the C turn, by the Python
    # turn (a batch bigger than the room left), or by a refill.
    assert read == []
    q.close()


def test_jobs_whose_records_were_overwritten_are_read_from_the_database(tmp_path, monkeypatch):
    """A small segment's arena (64 slots: 16 KiB) holds the last ~30 of 60
    jobs of ~540 bytes; every job still runs with its own payload."""
    q = engine.Queue(str(tmp_path / "q.db"), capacity=64)
    q.submit_batch([engine.Job("t.big", args=(i, "b" * 480)) for i in range(60)])
    read = _count_reads(monkeypatch)
    jobs = []
    while len(jobs) < 60:
        jobs += q.claim(64, timeout=5)
    assert sorted(j.args for j in jobs) == [(i, "b" * 480) for i in range(60)]
    first = sorted(j.id for j in jobs)
    assert set(read) == set(first[:len(read)])  # the oldest ones, and only they
    assert 10 < len(read) < 50
    for j in jobs:
        assert j.complete()
    q.close()


CHURN = """
import hashlib, sys, time
from engine.shm import Segment, lib
seg = Segment.attach(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
tid = 0
print("go", flush=True)
while time.monotonic() < end:
    tid += 1
    body = hashlib.sha256(str(tid).encode()).digest() * (12 + tid % 3)
    ref = lib.hr_jc_put(seg._mem, tid, b"churn", 5, body, len(body), 1, tid, 3, 7)
    if tid > 9:  # the oldest placed record is the one this put overwrites
        seg.remove(tid - 9)
        _, m, epoch = seg.peek_dirty(64)
        seg.advance_dirty(m, epoch)
    seg.push(tid, aux=ref)
print(tid)
"""


def test_a_reader_racing_the_writer_round_the_arena_gets_whole_records_or_misses(segname):
    """One process caches jobs as fast as it can in an arena of 4 KiB (about
    nine records), placing each and dropping the oldest only after the next
    put has begun to overwrite it; this one claims what it finds in the
    slots meanwhile.  Every hit is the record of its own task, whole."""
    import hashlib
    slots = 16
    seg = Segment.create(segname, slots)
    child = spawn(CHURN, segname, 3.0)
    assert child.stdout.readline().strip() == "go"
    buf = Segment.tickets(slots)
    hits = looks = 0
    while child.poll() is None:
        for k in range(slots):
            s = seg.read_slot(k)
            buf[k].id, buf[k].slot, buf[k].attempt = s.id, k, 1
        for k, row in enumerate(seg.cached_jobs(buf, slots)):
            if row is None:
                continue
            tid = buf[k].id
            body = hashlib.sha256(str(tid).encode()).digest() * (12 + tid % 3)
            assert row == ("churn", 1, tid, body, 3, 7), tid
            hits += 1
        looks += 1
    out, err = child.communicate()
    assert child.returncode == 0, err
    assert int(out) > 1000 and looks > 100 and hits > 100, (out, looks, hits)
    seg.close()
