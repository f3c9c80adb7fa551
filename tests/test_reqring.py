"""The request area and the task-id counter.

A Hypothesis state machine drives the ring against a pure-Python model on a
4 KiB area, so that wrap-around pads and "full" happen all the time; real
producer processes push thousands of requests through a small area and wait
for their answers; a producer killed inside a reserve leaves a usable area;
attach refuses a tampered request-area header.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import signal
import struct
import threading
import time
from collections import deque
from typing import Deque, List, Optional

import hypothesis.strategies as st
import pytest
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine import errors
from engine._core import lib
from engine.shm import (DEFAULT_REQ_BYTES, EV_COMMIT, EV_WRITER, REQ_ABANDONED, REQ_ANSWERED, REQ_DONE,
                        REQ_HEADER, REQ_PAD, REQ_READY, REQ_RESERVED, ReqHeader, Segment, segment_path)

from helpers import model_settings, run_child, spawn

REQ = 4096
_names = itertools.count()


def need(nbytes: int) -> int:
    return (REQ_HEADER + nbytes + 31) // 32 * 32


def answer_for(data: bytes) -> bytes:
    """What the consumer sends back: shorter than the request, and not the request."""
    return data[::-1][: len(data) // 2 + 4]


# ---- the model -----------------------------------------------------------------


class Rec:
    def __init__(self, pos: int, len: int, state: int, nbytes: int) -> None:
        self.pos, self.len, self.state, self.nbytes = pos, len, state, nbytes
        self.data: Optional[bytes] = None    # the request, once written
        self.answer: Optional[bytes] = None  # the answer, once answered


class ReqRingModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.seg = Segment.create(f"reqmodel-{os.getpid()}-{next(_names)}", 4, req_bytes=REQ)
        self.pid = os.getpid()
        self.head = self.tail = 0
        self.recs: Deque[Rec] = deque()  # every record in [head, tail), pads included
        self.cursor = 0                  # the consumer's position
        self.next_id = 1

    def teardown(self) -> None:
        path = self.seg.path
        self.seg.close()
        os.unlink(path)

    def _in(self, *states: int) -> List[Rec]:
        return [r for r in self.recs if r.state in states]

    def _by_pos(self, pos: int) -> Rec:
        return next(r for r in self.recs if r.pos == pos)

    # ---- producers -------------------------------------------------------------

    @rule(nbytes=st.integers(0, 300) | st.integers(0, REQ // 2)
          | st.sampled_from([REQ // 2 - 33, REQ // 2 - 32, REQ // 2 - 31, REQ // 2, 2**32 - 1]))
    def reserve(self, nbytes: int) -> None:
        n = need(nbytes)
        if n > REQ // 2:
            with pytest.raises(errors.InvalidArgument):
                self.seg.req_reserve(nbytes)
            return
        off = self.tail % REQ
        pad = REQ - off if off + n > REQ else 0
        writer_ev = self.seg.event(EV_WRITER)
        pos = self.seg.req_reserve(nbytes)
        if self.tail + pad + n - self.head > REQ:
            assert pos is None, "reserved although the model says the space is short"
            assert self.seg.event(EV_WRITER) != writer_ev, "a full area must nudge the writer"
            return
        assert pos == self.tail + pad, "reserve refused or misplaced although the space suffices"
        if pad:
            self.recs.append(Rec(self.tail, pad, REQ_PAD, 0))
        r = Rec(pos, n, REQ_RESERVED, nbytes)
        self.recs.append(r)
        self.tail = pos + n
        assert self.seg.req_get(pos) == ReqHeader(pos, n, REQ_RESERVED, self.pid, nbytes, 0)

    @precondition(lambda self: self._in(REQ_RESERVED))
    @rule(data=st.data(), publish=st.booleans())
    def write_publish(self, data: st.DataObject, publish: bool) -> None:
        r = data.draw(st.sampled_from(self._in(REQ_RESERVED)))
        seed = data.draw(st.integers(0, 2**32))
        body = random.Random(seed).randbytes(r.nbytes)
        with pytest.raises(errors.InvalidArgument):
            self.seg.req_write(r.pos, bytes(r.len - REQ_HEADER + 1))  # one byte more than the record holds
        self.seg.req_write(r.pos, body)
        r.data = body
        if publish:
            ev = self.seg.event(EV_WRITER)
            self.seg.req_publish(r.pos)
            assert self.seg.event(EV_WRITER) != ev
            r.state = REQ_READY

    @precondition(lambda self: self._in(REQ_ANSWERED))
    @rule(data=st.data())
    def producer_done(self, data: st.DataObject) -> None:
        r = data.draw(st.sampled_from(self._in(REQ_ANSWERED)))
        h = self.seg.req_get(r.pos)
        assert h is not None and h.state == REQ_ANSWERED and h.nbytes == len(r.answer)
        assert self.seg.req_read(r.pos, h.nbytes) == r.answer
        self.seg.req_set_state(r.pos, REQ_DONE)
        r.state = REQ_DONE

    @precondition(lambda self: self._in(REQ_RESERVED, REQ_READY, REQ_ANSWERED))
    @rule(data=st.data())
    def abandon(self, data: st.DataObject) -> None:
        r = data.draw(st.sampled_from(self._in(REQ_RESERVED, REQ_READY, REQ_ANSWERED)))
        self.seg.req_set_state(r.pos, REQ_ABANDONED)
        r.state = REQ_ABANDONED

    # ---- the consumer --------------------------------------------------------------

    @rule(data=st.data())
    def consume(self, data: st.DataObject) -> None:
        h = self.seg.req_next(self.cursor)
        want = next((r for r in self.recs if r.pos >= self.cursor and r.state != REQ_PAD), None)
        if want is None:
            assert h is None
            return
        assert h == ReqHeader(want.pos, want.len, want.state, self.pid, want.nbytes, 0)
        if want.state == REQ_RESERVED:
            return  # not published yet: the consumer waits here
        if want.state == REQ_READY:
            assert self.seg.req_read(want.pos, want.nbytes) == want.data
            extra = data.draw(st.integers(0, want.len - REQ_HEADER - len(answer_for(want.data))))
            ans = answer_for(want.data) + bytes([7]) * extra
            assert self.seg.req_answer(want.pos, ans) is True
            want.state, want.nbytes, want.answer = REQ_ANSWERED, len(ans), ans
        self.cursor = want.pos + want.len  # past READY (answered) and ABANDONED records

    @precondition(lambda self: self._in(REQ_ABANDONED))
    @rule(data=st.data())
    def answer_after_abandon(self, data: st.DataObject) -> None:
        """The producer gave up first: the answer must not resurrect the record."""
        r = data.draw(st.sampled_from(self._in(REQ_ABANDONED)))
        late = b"late"[: r.len - REQ_HEADER]
        assert self.seg.req_answer(r.pos, late) is False
        r.nbytes = len(late)
        assert self.seg.req_get(r.pos).state == REQ_ABANDONED

    @rule(data=st.data())
    def reclaim(self, data: st.DataObject) -> None:
        choices = [self.cursor, self.tail, 2**62] + [r.pos for r in self.recs]
        upto = data.draw(st.sampled_from(choices))
        ev = self.seg.event(EV_COMMIT)
        got = self.seg.req_reclaim(upto)
        old = self.head
        while self.recs and self.recs[0].pos < upto and self.recs[0].state in (REQ_DONE, REQ_PAD, REQ_ABANDONED):
            self.recs.popleft()
        self.head = self.recs[0].pos if self.recs else self.tail
        assert got == self.head
        assert (self.seg.event(EV_COMMIT) != ev) == (self.head != old), "notify exactly when the head moved"
        self.cursor = max(self.cursor, self.head)

    # ---- bad positions and states ------------------------------------------------

    @rule(data=st.data())
    def bad_positions(self, data: st.DataObject) -> None:
        assert self.seg.req_get(self.tail) is None
        assert self.seg.req_next(self.tail + 32 * data.draw(st.integers(0, 3))) is None
        with pytest.raises(errors.InvalidArgument):
            self.seg.req_set_state(self.tail, REQ_READY)  # no record there yet
        if self.head >= 32:
            with pytest.raises(errors.InvalidArgument):
                self.seg.req_get(self.head - 32)  # reclaimed
        if self.recs:
            r = data.draw(st.sampled_from(list(self.recs)))
            with pytest.raises(errors.InvalidArgument):
                self.seg.req_get(r.pos + data.draw(st.integers(1, 31)))  # misaligned
            for bad in (0, REQ_PAD, 7):
                with pytest.raises(errors.InvalidArgument):
                    self.seg.req_set_state(r.pos, bad)
            if r.state == REQ_PAD:
                with pytest.raises(errors.InvalidArgument):
                    self.seg.req_write(r.pos, b"x")
                with pytest.raises(errors.InvalidArgument):
                    self.seg.req_set_state(r.pos, REQ_DONE)

    # ---- task ids --------------------------------------------------------------------

    @rule(n=st.integers(0, 5), raise_to=st.none() | st.integers(0, 200))
    def ids(self, n: int, raise_to: Optional[int]) -> None:
        if raise_to is not None:
            self.seg.raise_next_id(raise_to)
            self.next_id = max(self.next_id, raise_to)
        assert self.seg.reserve_ids(n) == self.next_id
        self.next_id += n

    @invariant()
    def structures_agree(self) -> None:
        self.seg.verify()
        assert self.seg.req_bounds() == (self.head, self.tail)
        info = self.seg.info()
        assert (info["req_head"], info["req_tail"], info["req_cap"], info["next_id"]) == (
            self.head, self.tail, REQ, self.next_id)
        assert 0 <= self.tail - self.head <= REQ
        for r in self.recs:
            assert r.pos % REQ + r.len <= REQ, "a record crosses the end of the area"
            assert self.seg.req_get(r.pos) == ReqHeader(r.pos, r.len, r.state, self.pid, r.nbytes, 0)
            if r.state == REQ_PAD:
                assert (r.pos + r.len) % REQ == 0
        pos = self.head
        for r in self.recs:  # records tile [head, tail)
            assert r.pos == pos
            pos += r.len
        assert pos == self.tail


TestReqRingModel = ReqRingModel.TestCase
TestReqRingModel.settings = model_settings(500, 150, 60)


# ---- sizes and arguments -----------------------------------------------------------


def test_request_area_sizes(segname):
    assert lib.hr_segment_size(8, 4096) > 4096
    assert lib.hr_segment_size(8, 1 << 20) - lib.hr_segment_size(8, 4096) == (1 << 20) - 4096
    for bad in (0, 2048, 4095, 4097, 3 << 12, 1 << 31):
        assert lib.hr_segment_size(8, bad) == 0, bad
        with pytest.raises(errors.InvalidArgument, match="req_bytes"):
            Segment.create(segname, 8, req_bytes=bad)
    s = Segment.create(segname, 8, req_bytes=8192, generation=12345)
    assert s.generation == 12345 and s.info()["req_cap"] == 8192
    assert lib.hr_init(s._mem, s.size, 8, 3000, os.geteuid(), 1) == lib.HR_E_INVALID
    s.close()
    b = Segment.open(segname, 99, req_bytes=1 << 20)  # exists: its own area wins
    assert b.info()["req_cap"] == 8192
    b.close()
    Segment.unlink(segname)
    c = Segment.open(segname, 8)
    assert c.info()["req_cap"] == DEFAULT_REQ_BYTES and c.info()["next_id"] == 1
    c.close()


def test_reserve_rejects_what_cannot_fit(segname):
    s = Segment.create(segname, 8, req_bytes=4096)
    biggest = 4096 // 2 - REQ_HEADER
    with pytest.raises(errors.InvalidArgument, match="at most 2016"):
        s.req_reserve(biggest + 1)
    for bad in (-1, 2**32, 1.5):
        with pytest.raises(errors.InvalidArgument):
            s.req_reserve(bad)
    pos = s.req_reserve(biggest)
    assert s.req_get(pos).len == 4096 // 2
    s.req_write(pos, bytes(biggest))
    with pytest.raises(errors.InvalidArgument):
        s.req_write(pos, bytes(biggest + 1))
    with pytest.raises(errors.InvalidArgument):
        s.req_read(pos, biggest + 1)
    with pytest.raises(errors.InvalidArgument):  # answer longer than the record
        s.req_answer(pos, bytes(biggest + 1))
    with pytest.raises(errors.InvalidState):  # not published yet
        s.req_answer(pos, b"x")
    s.close()


def test_send_and_await_a_whole_request_in_one_call_each(segname):
    """req_send reserves, writes and publishes (waking the writer); None
    while the area is full.  req_await gives the answer once it is there
    (the record is then DONE), None on a timeout, and InvalidState for an
    abandoned record."""
    s = Segment.create(segname, 8, req_bytes=4096)
    try:
        ev = s.event(EV_WRITER)
        pos = s.req_send(b"hello", 100)
        h = s.req_get(pos)
        assert (h.state, h.nbytes, s.req_read(pos, 5)) == (REQ_READY, 5, b"hello") and h.len == need(100)
        assert s.event(EV_WRITER) == ev + 1
        t0 = time.monotonic()
        assert s.req_await(pos, 0.05) is None and time.monotonic() - t0 >= 0.04
        threading.Timer(0.05, lambda: (s.req_answer(pos, b"world!"), s.notify(EV_COMMIT))).start()
        assert s.req_await(pos, 5.0) == b"world!"
        assert s.req_get(pos).state == REQ_DONE
        other = s.req_send(b"x" * 10)
        s.req_set_state(other, REQ_ABANDONED)
        with pytest.raises(errors.InvalidState):
            s.req_await(other, 1.0)
        with pytest.raises(errors.InvalidArgument, match="at most 2016"):
            s.req_send(b"x" * 2017)
        while s.req_send(b"y" * 1000) is not None:
            pass  # fills the area: then None, not an error
    finally:
        s.close()


def test_answer_then_sweep_frees_what_dead_producers_never_read(segname):
    """req_answer writes the answer and moves READY to ANSWERED in one call
    (refusing an abandoned record and an answer too big for it); req_sweep
    abandons answered records of producers that died before reading them,
    stops at one a live producer has yet to read, and frees the rest."""
    s = Segment.create(segname, 8, req_bytes=4096)
    try:
        pid = os.fork()
        if pid == 0:  # a producer that sends, then dies without reading its answer
            s.req_send(b"from a dead producer", 64)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        dead = s.req_bounds()[0]
        assert s.req_get(dead).pid == pid
        mine = s.req_send(b"mine", 64)
        gone = s.req_send(b"abandoned", 64)
        s.req_set_state(gone, REQ_ABANDONED)
        with pytest.raises(errors.InvalidArgument):
            s.req_answer(dead, b"z" * 200)  # more than the record holds
        assert s.req_get(dead).state == REQ_READY
        assert s.req_answer(dead, b"A1") and s.req_answer(mine, b"A2")
        assert s.req_answer(gone, b"A3") is False and s.req_get(gone).state == REQ_ABANDONED
        h = s.req_get(mine)
        assert (h.state, h.nbytes, s.req_read(mine, 2)) == (REQ_ANSWERED, 2, b"A2")
        tail = s.req_bounds()[1]
        assert s.req_sweep(tail) == mine, "stops at the answer a live producer has yet to read"
        assert s.req_bounds()[0] == mine
        assert s.req_await(mine, 1.0) == b"A2"  # read: DONE
        assert s.req_sweep(tail) == tail == s.req_bounds()[0]
        s.verify()
    finally:
        s.close()


def test_a_position_inside_a_record_is_refused(segname):
    s = Segment.create(segname, 8, req_bytes=4096)
    pos = s.req_reserve(200)
    s.req_write(pos, bytes(200))  # zeros: nothing in the data looks like a header at 32
    for inner in range(pos + 32, pos + need(200), 32):
        with pytest.raises(errors.InvalidArgument):
            s.req_get(inner)
        with pytest.raises(errors.InvalidArgument):
            s.req_set_state(inner, REQ_DONE)
    s.close()


# ---- real producer processes ------------------------------------------------------

PRODUCER = """
import json, os, sys
from engine.shm import Segment, EV_COMMIT, REQ_ANSWERED, REQ_DONE
seg = Segment.attach(sys.argv[1])
me, count = int(sys.argv[2]), int(sys.argv[3])

def payload(i):
    return f"{me}:{i}:".encode() + bytes([(me * 31 + i) % 251]) * ((i * 37 + me * 11) % 700)

def answer_for(data):
    return data[::-1][: len(data) // 2 + 4]

outstanding, sent, got, full = [], 0, 0, 0
while got < count:
    ev = seg.event(EV_COMMIT)
    progressed = False
    while sent < count:  # fill the area as far as it goes
        data = payload(sent)
        pos = seg.req_reserve(len(data))
        if pos is None:
            full += 1
            break
        seg.req_write(pos, data)
        seg.req_publish(pos)
        outstanding.append((pos, sent))
        sent += 1
        progressed = True
    while outstanding:  # answers come in ring order, so the oldest first
        pos, i = outstanding[0]
        h = seg.req_get(pos)
        assert h.pid == os.getpid(), h
        if h.state != REQ_ANSWERED:
            break
        ans = seg.req_read(pos, h.nbytes)
        assert ans == answer_for(payload(i)), (i, ans)
        seg.req_set_state(pos, REQ_DONE)
        outstanding.pop(0)
        got += 1
        progressed = True
    if not progressed:
        seg.wait(EV_COMMIT, ev, 0.05)
print(json.dumps({"got": got, "full": full}))
"""


def test_producers_get_their_own_answers(segname):
    producers, per = 4, 2000
    seg = Segment.create(segname, 8, req_bytes=64 << 10)
    procs = [spawn(PRODUCER, segname, p, per) for p in range(producers)]
    pid_of = {p.pid: k for k, p in enumerate(procs)}
    seen = {}
    cursor, answered = seg.req_bounds()[0], 0
    deadline = time.monotonic() + 120
    while answered < producers * per:
        ev = seg.event(EV_WRITER)
        h = seg.req_next(cursor)
        if h is None or h.state == REQ_RESERVED:
            seg.notify(EV_COMMIT)  # end of a batch
            seg.req_reclaim(cursor)
            seg.wait(EV_WRITER, ev, 0.01)
            assert time.monotonic() < deadline, f"stuck after {answered} answers"
            dead = [p.returncode for p in procs if p.poll() not in (None, 0)]
            assert not dead, (dead, [p.stderr.read() for p in procs if p.returncode])
            continue
        assert h.state == REQ_READY, h
        data = seg.req_read(h.pos, h.nbytes)
        me, i, _ = data.split(b":", 2)
        key = (int(me), int(i))
        assert key not in seen, f"request {key} seen twice"
        assert pid_of[h.pid] == key[0], "the record names another producer's pid"
        seen[key] = h.pos
        assert seg.req_answer(h.pos, answer_for(data))
        cursor = h.pos + h.len
        answered += 1
        if answered % 32 == 0:
            seg.notify(EV_COMMIT)
            seg.req_reclaim(cursor)
    seg.notify(EV_COMMIT)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(seen) == [(me, i) for me in range(producers) for i in range(per)]
    assert all(r["got"] == per for r in results)
    assert sum(r["full"] for r in results) > 0, "the area never filled up: make it smaller"
    # Every producer marked its records done, so everything is reclaimable.
    assert seg.req_reclaim(cursor) == cursor == seg.req_bounds()[1]
    assert seg.req_next(cursor) is None
    seg.verify()
    seg.close()


# ---- a producer killed inside reserve -------------------------------------------------

RESERVER = """
import sys
from engine.shm import Segment
seg = Segment.attach(sys.argv[1])
for n in map(int, sys.argv[2].split(",")):
    print(seg.req_reserve(n), flush=True)
print("survived")
"""


@pytest.mark.parametrize("with_pad", [False, True])
def test_producer_killed_in_reserve(segname, with_pad):
    seg = Segment.create(segname, 8, req_bytes=4096)
    if with_pad:  # move the tail to 3072 so that the next 1500-byte record needs a pad
        for _ in range(2):
            p = seg.req_reserve(1500)
            seg.req_set_state(p, REQ_DONE)
        assert seg.req_reclaim(2**62) == 3072
    head, _ = seg.req_bounds()
    # The third reserve dies holding the lock: header (and pad) written, tail
    # not advanced.  With the pad, 3392 + 1536 crosses the end of the area.
    sizes = [100, 100, 1500] if with_pad else [100, 200, 300]
    child = spawn(RESERVER, segname, ",".join(map(str, sizes)), env={"HEADRACE_FAULT": "req_reserve:3"})
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, (child.returncode, out, err)
    done = [int(x) for x in out.split()]
    assert len(done) == 2 and "survived" not in out
    _, tail2 = seg.req_bounds()
    assert tail2 == max(done) + need(sizes[1]), "the killed reserve advanced the tail"

    # Another process retries the same reserve: the lock was repaired and the
    # dead half-record is overwritten.
    r = run_child(f"""
        from engine.shm import Segment
        s = Segment.attach({segname!r})
        print(s.req_reserve({sizes[2]}))
    """)
    assert r.returncode == 0, r.stderr
    pos = int(r.stdout)
    assert seg.info()["stats"]["repairs"] == 1
    seg.verify()
    if with_pad:
        assert tail2 == 3392 and pos == 4096  # a pad, then the record at the start of the area
        assert seg.req_get(tail2).state == REQ_PAD
    else:
        assert pos == tail2

    # The dead producer's two complete records are walkable; abandoning them
    # lets the consumer reclaim past them.
    walked, p = [], head
    while (h := seg.req_next(p)) is not None:
        walked.append(h)
        p = h.pos + h.len
    assert [h.pos for h in walked] == done + [pos]
    assert [h.pid for h in walked[:2]] == [child.pid] * 2
    assert all(h.state == REQ_RESERVED for h in walked)
    for h in walked[:2]:
        seg.req_set_state(h.pos, REQ_ABANDONED)
    assert seg.req_reclaim(2**62) == pos
    seg.verify()
    seg.close()


# ---- a tampered header is refused at attach ----------------------------------------------

OFF_REQ, REQ_CAP, CHECKSUM = 112, 120, 144  # then off_jc (128) and jc_cap (136)
REQ_TAIL, REQ_HEAD = 272, 576  # offsetof(hr_header, ...) in layout 5


def _fnv1a(data: bytes) -> int:
    x = 0xCBF29CE484222325
    for b in data:
        x = ((x ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return x


def _read(path: str, off: int, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _resign(path: str) -> None:
    head = _read(path, 0, CHECKSUM)
    _patch(path, CHECKSUM, struct.pack("<Q", _fnv1a(head[8:])))


def _fresh(segname: str) -> str:
    """A segment with head 96 and tail 352 (a reclaimed record, then three live ones)."""
    Segment.unlink(segname)
    s = Segment.create(segname, 8, req_bytes=4096)
    for n in (64, 100, 32, 0):
        s.req_reserve(n)
    s.req_set_state(0, REQ_DONE)
    assert s.req_reclaim(2**62) == 96 and s.req_bounds() == (96, 352)
    s.close()
    path = segment_path(segname)
    assert struct.unpack("<QQ", _read(path, OFF_REQ, 16))[1] == 4096, "header layout moved; update REQ_CAP"
    assert struct.unpack("<Q", _read(path, REQ_TAIL))[0] == 352, "header layout moved; update REQ_TAIL"
    assert struct.unpack("<Q", _read(path, REQ_HEAD))[0] == 96, "header layout moved; update REQ_HEAD"
    return path


@pytest.mark.parametrize("field,value,resign", [
    (OFF_REQ, +64, False), (OFF_REQ, +64, True), (OFF_REQ, -64, True),
    (REQ_CAP, 8192, False), (REQ_CAP, 8192, True), (REQ_CAP, 4096 + 32, True), (REQ_CAP, 1 << 40, True),
    (REQ_HEAD, 384, False),           # head past the tail
    (REQ_HEAD, 97, False),            # head not a record boundary
    (REQ_TAIL, 356, False),           # tail not a record boundary
    (REQ_TAIL, 96 + 4096 + 32, False),  # more than the area in flight
])
def test_tampered_request_area_is_refused_at_attach(segname, field, value, resign):
    path = _fresh(segname)
    Segment.attach(segname).close()  # the untampered segment attaches
    old = struct.unpack("<Q", _read(path, field))[0]
    new = old + value if field == OFF_REQ else value
    _patch(path, field, struct.pack("<Q", new))
    if resign:
        _resign(path)
    with pytest.raises(errors.SegmentCorrupt):
        Segment.attach(segname)


def test_tail_over_garbage_passes_attach_but_fails_verify(segname):
    path = _fresh(segname)
    _patch(path, REQ_TAIL, struct.pack("<Q", 352 + 64))  # sane counters, but nothing was written there
    s = Segment.attach(segname)
    with pytest.raises(errors.SegmentCorrupt, match="request record at 352 has length 0"):
        s.verify()
    s.close()
    path = _fresh(segname)
    with open(path, "r+b") as f:  # a live record's own position scribbled over
        off_req = struct.unpack("<Q", _read(path, OFF_REQ))[0]
        f.seek(off_req + 96 + 16)
        f.write(struct.pack("<Q", 5))
    s = Segment.attach(segname)
    with pytest.raises(errors.SegmentCorrupt, match="says it is at 5"):
        s.verify()
    s.close()


# ---- task ids --------------------------------------------------------------------------

IDS = """
import json, sys
from engine.shm import Segment
seg = Segment.attach(sys.argv[1])
print(json.dumps([(seg.reserve_ids(k % 5 + 1), k % 5 + 1) for k in range(int(sys.argv[2]))]))
"""


def test_reserve_ids_are_disjoint_across_processes(segname):
    seg = Segment.create(segname, 8, req_bytes=4096)
    assert seg.reserve_ids(3) == 1
    procs = [spawn(IDS, segname, 3000) for _ in range(2)]
    ranges = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        ranges += json.loads(out)
    ids = [i for first, n in ranges for i in range(first, first + n)]
    assert len(ids) == len(set(ids)), "two processes got the same id"
    nxt = seg.info()["next_id"]
    assert sorted(ids) == list(range(4, nxt))
    seg.raise_next_id(nxt + 100)
    assert seg.reserve_ids(1) == nxt + 100
    seg.raise_next_id(5)  # never lowers
    assert seg.info()["next_id"] == nxt + 101
    seg.raise_next_id(nxt + 101)  # equal: no change
    assert seg.reserve_ids(0) == nxt + 101 == seg.info()["next_id"]
    seg.close()


def test_threads_sharing_a_segment_get_their_own_ids_and_records(segname):
    """cffi drops the GIL inside C calls: per-object output buffers would be
    overwritten by another thread between the call and the read."""
    seg = Segment.create(segname, 8, req_bytes=1 << 20)
    got: List[List[int]] = [[] for _ in range(4)]
    bad: List[str] = []

    def work(k: int) -> None:
        for i in range(3000):
            got[k].append(seg.reserve_ids(1))
            body = f"{k}:{i}".encode()
            pos = seg.req_reserve(len(body))
            if pos is None:
                bad.append("full")
                return
            seg.req_write(pos, body)
            h = seg.req_get(pos)
            if seg.req_read(pos, len(body)) != body or h.nbytes != len(body):
                bad.append(f"{k}:{i} read back another thread's record")
            seg.req_set_state(pos, REQ_DONE)
            if k == 0 and i % 64 == 0:
                seg.req_reclaim(2**62)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad, bad[:5]
    ids = [i for g in got for i in g]
    assert sorted(ids) == list(range(1, 12001)), "two threads got the same id"
    seg.verify()
    seg.close()


def test_a_lease_thread_heartbeating_never_hijacks_a_finish(segname):
    """A worker's lease thread heartbeats while its main thread finishes jobs."""
    seg = Segment.create(segname, 16, req_bytes=4096)
    seg.push(1)
    held = seg.pop(2**62)
    stop = threading.Event()
    fenced: List[int] = []

    def lease() -> None:
        while not stop.is_set():
            if not seg.heartbeat(held, 2**62):
                fenced.append(1)

    t = threading.Thread(target=lease)
    t.start()
    try:
        for id in range(2, 3002):
            seg.push(id)
            ticket = seg.pop(2**62)
            assert ticket.id == id
            assert seg.finish(ticket), f"finish of {id} was applied to another ticket"
            assert seg.get(id).state_name == "completed"
            assert seg.get(1).state_name == "running", "the held job was finished by someone else's call"
            recs, n, epoch = seg.peek_dirty(64)
            seg.advance_dirty(n, epoch)
    finally:
        stop.set()
        t.join()
    assert not fenced, "the held job's heartbeat was fenced"
    seg.verify()
    seg.close()
