"""submit_batch sends a chunk of plain jobs in parts, as it serialises them,
and the writer stores each part as it arrives in one transaction that
commits when the chunk is whole.  These tests hold the rules that make that
safe: a chunk is stored whole or not at all, whatever happens to its
producer between parts, and a producer that stalls between parts holds
back nobody's flushes."""
from __future__ import annotations

import enum
import signal
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
from engine import api, errors, protocol, shm
from engine.writer import STREAM_STALL
from engine_helpers import wait_for
from helpers import spawn


def _stored(q: engine.Queue) -> list:
    """The first argument of every stored task, sorted (ints and strs apart)."""
    return _sort(engine.api.loads(ser, body)[0][0] for ser, body in q.reader.conn.execute(
        "SELECT t.ser, p.body FROM tasks t JOIN payloads p ON p.id = t.id"))


def _sort(xs) -> list:
    return sorted(xs, key=lambda x: (isinstance(x, str), x))


def _streamed(q: engine.Queue, before: int) -> int:
    time.sleep(0.2)  # totals reach the counters table within an upkeep pass
    return q.reader.counters().get("streamed", 0) - before


def test_a_streamed_batch_keeps_per_item_outcomes_priority_and_fifo(db):
    """Bad jobs in several parts are rejected alone, by index; the rest get
    ids in input order and run by priority, FIFO within one."""
    bad_at = {3, 100, 700, 1999}
    jobs = [engine.Job("t", args=(object(),) if k in bad_at else (k,), priority=k % 3) for k in range(2000)]
    with engine.Queue(db) as q:
        out = q.submit_batch(jobs)
        assert [k for k, o in enumerate(out.outcomes) if o.kind == "rejected"] == sorted(bad_at)
        assert all(isinstance(o.error, errors.NotSerializable) for o in out.outcomes if o.kind == "rejected")
        ids = [o.id for o in out.outcomes if o.kind == "inserted"]
        assert len(ids) == 1996 and ids == sorted(ids), "ids follow the input order"
        assert _stored(q) == [k for k in range(2000) if k not in bad_at]
        order = [j.args[0] for j in q.claim(max=2000, timeout=5)]
        assert order == sorted((k for k in range(2000) if k not in bad_at), key=lambda k: (-(k % 3), k))
        assert q.verify() == 1996


def test_the_writer_works_ahead_on_a_batch_and_stores_it_in_one_transaction(db):
    with engine.Queue(db) as q:
        q.submit("t", args=(-1,))
        wait_for(lambda: q.reader.counters().get("submit_txns"), what="totals written")
        before = q.reader.counters()
        out = q.submit_batch([engine.Job("t", args=(k,)) for k in range(5000)])
        assert len(out.inserted) == 5000
        assert _streamed(q, before.get("streamed", 0)) == 1, "the writer started before the chunk was whole"
        assert q.reader.counters()["submit_txns"] - before["submit_txns"] == 1
        assert [j.args[0] for j in q.claim(max=5001, timeout=5)] == [-1] + list(range(5000))


def test_a_record_that_fills_up_carries_the_part_into_the_next_chunk(db):
    """The record is sized from the first part; later, larger payloads that
    do not fit start the next chunk.  Everything is stored, in order."""
    jobs = [engine.Job("t", args=(k, "x" * (0 if k < 64 else 20_000))) for k in range(1000)]
    with engine.Queue(db) as q:
        before = q.reader.counters().get("submit_txns", 0)
        out = q.submit_batch(jobs)
        assert len(out.inserted) == 1000 and out.inserted == sorted(out.inserted)
        time.sleep(0.2)
        assert q.reader.counters()["submit_txns"] - before > 1, "it took more than one chunk"
        assert [j.args[0] for j in q.claim(max=1000, timeout=5)] == list(range(1000))


@pytest.mark.parametrize("size", [6_000, 400_000])
def test_parts_too_big_for_a_small_request_area_are_split(db, size):
    """With a 1 MiB request area (records of at most 512 KiB), parts of
    large payloads are cut to the room left, and a part too big for any
    record goes the plain way, split by bytes (this used to loop for ever)."""
    jobs = [engine.Job("t", args=(k, "x" * (size if k % 3 else 10))) for k in range(600)]
    with engine.Queue(db, request_bytes=1 << 20) as q:
        out = q.submit_batch(jobs)
        assert len(out.inserted) == 600 and out.inserted == sorted(out.inserted)
        assert [j.args[0] for j in q.claim(max=600, timeout=5)] == list(range(600))


def test_a_first_part_wholly_rejected_still_streams_the_rest(db):
    jobs = [engine.Job("t", args=(object(),) if k < 64 else (k,)) for k in range(700)]
    with engine.Queue(db) as q:
        out = q.submit_batch(jobs)
        assert [o.kind for o in out.outcomes[:64]] == ["rejected"] * 64
        assert len(out.inserted) == 636
        assert _stored(q) == list(range(64, 700))


def test_an_exception_between_parts_stores_nothing_of_the_chunk(db, monkeypatch):
    """A KeyboardInterrupt (or any error) while the third part is being
    serialised abandons the record: the writer rolls back the parts it took."""
    with engine.Queue(db, chunk=1000) as q:
        real = api.Queue._stream_part
        calls = []

        def part(self, *a, **k):
            calls.append(1)
            if len(calls) == 7:  # the first chunk (4 parts) went whole; this is the second's third
                raise KeyboardInterrupt
            return real(self, *a, **k)
        monkeypatch.setattr(api.Queue, "_stream_part", part)
        with pytest.raises(KeyboardInterrupt):
            q.submit_batch([engine.Job("t", args=(k,)) for k in range(2500)])
        monkeypatch.setattr(api.Queue, "_stream_part", real)
        after = q.submit("t", args=("after",))
        assert q.get(after).state == "pending"
        assert _stored(q) == list(range(1000)) + ["after"]
        assert q.verify() == 1001


# A producer that streams a record by hand: part one, then (per argv[2])
# dies, or stalls 1 s before it sends part two and publishes.
STREAMER = r'''
import sys, time, engine
from engine import protocol, shm
q = engine.Queue(sys.argv[1])
seg = q.seg
def frame(lo, hi):
    first = seg.reserve_ids(hi - lo)
    items = [(first + k,) + q._item("t", (lo + k,), {}, 0, None, None, shm.now_us())[1:] for k in range(hi - lo)]
    return protocol.encode_frame(0, items)
f1, f2 = frame(0, 100), frame(100, 200)
pos = q._reserve(len(f1) + len(f2) + 64, 200)
seg.req_write(pos, f1)
seg.req_stream(pos, len(f1))
print("part1", flush=True)
if sys.argv[2] == "die":
    time.sleep(60)
time.sleep(1.0)
seg.req_write(pos, f2, len(f1))
seg.req_stream(pos, len(f1) + len(f2))
seg.req_publish(pos, len(f1) + len(f2))
kinds, flat = protocol.decode_answer(q._await_answer(pos))
print("ids", len(kinds), flat[0], flat[2 * 199], flush=True)
'''


def test_a_producer_killed_between_parts_leaves_nothing_and_the_writer_carries_on(db):
    with engine.Queue(db) as q:
        p = spawn(STREAMER, db, "die")
        assert p.stdout.readline().strip() == "part1"
        time.sleep(0.03)  # the writer is storing part one, in its open transaction
        p.send_signal(signal.SIGKILL)
        p.wait()
        after = q.submit("t", args=("after",))  # behind the dead record in the request area
        assert _stored(q) == ["after"], "nothing of the dead producer's chunk"
        assert q.verify() == 1


def test_a_stalled_producer_is_handled_whole_and_does_not_hold_back_flushes(db):
    """The writer gives up working ahead after STREAM_STALL, rolls back, and
    goes on flushing outcomes; the record is stored whole once it is READY."""
    assert STREAM_STALL < 0.5  # the streamer pauses 1 s
    with engine.Queue(db) as q:
        tid = q.submit("t", args=("first",))
        before = q.reader.counters().get("streamed", 0)
        p = spawn(STREAMER, db, "stall")
        assert p.stdout.readline().strip() == "part1"
        (job,) = q.claim(max=1, timeout=5)
        assert job.complete()
        wait_for(lambda: q.reader.conn.execute(
            "SELECT count(*) FROM outcomes WHERE id = ? AND state = ?", (tid, shm.COMPLETED)).fetchone()[0] == 1,
            timeout=0.8, what="the outcome flushed while the producer stalls")
        line = p.stdout.readline().split()
        assert p.wait(30) == 0, p.stderr.read()
        assert line[:2] == ["ids", "200"]
        assert _stored(q) == list(range(200)) + ["first"]
        assert _streamed(q, before) == 0, "stored whole, not by the rolled-back work ahead"
        assert q.verify() == 200


# ---- one JSON call for a part of jobs alike (Queue._plain_frame, csrc/plain.c) ----

_JSONABLE = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63) | st.floats(allow_nan=True)
    | st.text(alphabet=st.sampled_from('ab"\\[]{},:\u00e9\u540d\n\x00 '), max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12)


def _one_by_one(q: engine.Queue, jobs: list, created: int) -> list:
    """The items the job-by-job way makes of `jobs`, without ids."""
    items, _ = q._job_items(enumerate(jobs), created, {})
    return [it[1:] for it in items]


def test_one_json_call_packs_each_job_as_the_job_by_job_way_does(db):
    with engine.Queue(db) as q:
        q._item("t", (), {}, 0, None, None, 0)  # the name is checked once, as any submit does

        @given(st.lists(st.tuples(st.lists(_JSONABLE, max_size=3), st.integers(0, 255)), min_size=1, max_size=40))
        @settings(max_examples=300, deadline=None)
        def check(specs):
            jobs = [engine.Job("t", args=a if k % 2 else tuple(a), priority=p) for k, (a, p) in enumerate(specs)]
            created = shm.now_us()
            frame = q._plain_frame(jobs, 0, created)
            assert frame is not None
            items = api._frame_items(frame)
            assert [it[1:] for it in items] == _one_by_one(q, jobs, created)
            assert [it[0] for it in items] == list(range(items[0][0], items[0][0] + len(jobs)))
        check()


def test_a_json_array_that_is_not_one_element_per_job_packs_nothing():
    def pack(text: str, n: int, max_body: int = 1000):
        return protocol.plain_frame(0, b"t", 1, 5, (0, -1, -1), 0, bytes(n), text.encode(), max_body)

    frame = pack('["a\\"],[",{"]":"[,"},[[1,[2]],{}]]', 3)
    assert [it[2] for it in api._frame_items(frame)] == [b'"a\\"],["', b'{"]":"[,"}', b'[[1,[2]],{}]']
    assert [it[2] for it in api._frame_items(pack("[NaN,-Infinity,1e+300]", 3))] == [b"NaN", b"-Infinity", b"1e+300"]
    for text, n in (("[1]", 2), ("[1,2]", 1), ("[1]x", 1), ("[1],[2]", 2), ('["a]', 1), ('["a\\"]', 1), ("{}", 1),
                    ("[]", 1), ("[,1]", 2), ("[1,]", 2), ("[[1]", 1), ("[1]]", 1), ("", 1), ("[1]", 0)):
        assert pack(text, n) is None, (text, n)
    assert pack('["abc"]', 1, max_body=5) is not None and pack('["abcd"]', 1, max_body=5) is None


class _Level(enum.IntEnum):
    HIGH = 9


def test_jobs_unlike_their_neighbours_go_job_by_job_with_the_same_outcomes(db, monkeypatch):
    """A part holding a job with a bool priority, an IntEnum one, keyword
    arguments, another name, an option set, an oversized or unserialisable
    payload is sent job by job: each job gets what it would get alone, and
    the parts without one still go in one JSON call."""
    odd = {100: dict(priority=True), 200: dict(priority=_Level.HIGH), 300: dict(kwargs={"x": 1}),
           400: dict(name="u"), 500: dict(max_attempts=3), 600: dict(args=("x" * 5000,)),
           700: dict(args=(object(),)), 800: dict(group="g")}
    jobs = [engine.Job(**{"name": "t", "args": (k,), **odd.get(k, {})}) for k in range(1000)]
    fast = []
    real = protocol.plain_frame

    def spy(*a):
        out = real(*a)
        fast.append(out is not None)
        return out
    monkeypatch.setattr(protocol, "plain_frame", spy)
    with engine.Queue(db, max_payload=4000) as q:
        q.submit("t", args=(-1,))
        out = q.submit_batch(jobs)
        assert [k for k, o in enumerate(out.outcomes) if o.kind == "rejected"] == [100, 600, 700]
        assert isinstance(out.outcomes[100].error, errors.InvalidArgument)
        assert isinstance(out.outcomes[600].error, errors.PayloadTooLarge)
        assert isinstance(out.outcomes[700].error, errors.NotSerializable)
        assert fast.count(True) >= 2, "the parts without an odd job went in one JSON call"
        got = {i.id: i for i in map(q.get, out.inserted)}
        assert got[out.outcomes[200].id].priority == 9 and got[out.outcomes[500].id].max_attempts == 3
        assert got[out.outcomes[400].id].name == "u"
        (body,) = q.reader.conn.execute("SELECT body FROM payloads WHERE id = ?", (out.outcomes[300].id,)).fetchone()
        assert api.loads(0, body) == ((300,), {"x": 1})
        assert _stored(q) == [-1] + [k for k in range(1000) if k not in (100, 600, 700)]


def test_a_batch_is_streamed_only_if_no_job_needs_the_whole_chunk():
    class Sub(engine.Job):
        pass
    plain = [engine.Job("t", args=(k,)) for k in range(3)]
    assert api._streamable(plain) and api._streamable(plain + [engine.Job("t", depends_on=[])])
    assert api._streamable(plain + [engine.Job("t", depends_on=())])
    for odd in (engine.Job("t", dedup_key="k"), engine.Job("t", depends_on=[1]), engine.Job("t", depends_on=(1,)),
                Sub("t"), ("t", (1,))):
        assert not api._streamable(plain + [odd]), odd
