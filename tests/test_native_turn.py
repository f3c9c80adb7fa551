"""The writer's turn for plain submits in C (csrc/turn.c): it stores and
shows exactly what the Python turn does, hands over to it on anything it
does not take, and refuses nothing the Python turn would not refuse."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Dict, Iterator, List, Tuple

import apsw
import pytest

import engine
from engine import Backoff, errors, faults, paths, protocol, shm, store
from engine_helpers import kill_writer, send_raw, wait_for, writer_in_process

#: The columns a submit decides (not id, seq or created: those differ between runs).
_COLS = "t.name, t.prio, t.run_at > 0, t.dedup, t.grp, t.max_attempts, t.ser, t.timeout_ms, t.backoff, p.body"


def _spy(monkeypatch: pytest.MonkeyPatch, w: Any) -> List[Tuple[int, int]]:
    """(items committed, SQLite error) of every C turn loop that did something.
    Returns once the writer's thread is in a spied loop: one it was in when
    the spy came (it may wait up to NATIVE_WAIT) would take submits unseen."""
    seen: List[Tuple[int, int]] = []
    if w.native is None:
        return seen
    real = w.native.loop
    entered = threading.Event()

    def loop(*a: Any) -> Any:
        entered.set()
        out = real(*a)
        if out.items or out.sql_rc:
            seen.append((out.items, out.sql_rc))
        return out
    monkeypatch.setattr(w.native, "loop", loop)
    assert entered.wait(30), "the writer's thread never entered the C turn loop"
    return seen


@contextlib.contextmanager
def _mix_queues(db: str, native: int) -> Iterator[Tuple[Any, engine.Queue, engine.Queue]]:
    """An in-process writer (C turn on or off, no flush due: the C turn
    leaves a due flush to the Python turn), with t.remote defined only by
    another process's worker and t.local by the JSON queue yielded with a
    pickle one."""
    with writer_in_process(db, upkeep=False, native_turn=native, flush_interval=60.0) as iw:
        with engine.Queue(db) as definer:
            @definer.task(name="t.remote", max_attempts=7, timeout=3.5,
                          backoff=Backoff.exponential(0.5, 60, jitter=True))
            def remote(i: int) -> None:
                pass
            definer._define()  # as a worker would: the writer now knows t.remote's limits
        with engine.Queue(db) as q, engine.Queue(db, serializer="pickle") as qp:
            @q.task(name="t.local", max_attempts=2, timeout=1.0, backoff=Backoff.linear(2, 10))
            def local(i: int) -> None:
                pass
            yield iw, q, qp


def _became(q: engine.Queue, claimer: engine.Queue, n: int) -> Dict[str, Any]:
    """What became of every submit: the stored rows, the events, the live
    state, and the first `n` claimed."""
    rows = q.reader.conn.execute(f"SELECT {_COLS}, t.id FROM tasks t JOIN payloads p ON p.id = t.id"
                                 " ORDER BY t.id").fetchall()
    events = q.reader.conn.execute("SELECT kind, n FROM events ORDER BY seq").fetchall()
    live = [(i.state, i.priority, i.max_attempts, i.run_at is not None) for i in map(q.get, [r[-1] for r in rows])]
    heads = [(j.args[0], j.attempt) for j in claimer.claim(max=n, timeout=5)]
    seqs = [r[0] for r in q.reader.conn.execute("SELECT seq FROM tasks ORDER BY id")]
    return {"rows": [r[:-1] for r in rows], "events": events, "live": live, "heads": heads,
            "fifo": seqs == sorted(seqs) and len(set(seqs)) == len(seqs)}


def _submit_mix(db: str, native: int, monkeypatch: pytest.MonkeyPatch) -> Dict[str, Any]:
    """A mix of plain submits (one by one and in small batches; defined here,
    defined only by another process's worker, not defined at all; delayed,
    prioritised, with attempt limits; JSON and pickle), and what became of it."""
    with _mix_queues(db, native) as (iw, q, qp):
        turns = _spy(monkeypatch, iw.w)
        k = 0
        for round_ in range(3):
            for name in ("t.remote", "t.local", "t.none"):
                q.submit(name, args=(k,), priority=k % 256)
                k += 1
                q.submit(name, args=(k,), max_attempts=k, delay=3600 if k % 2 else None)
                k += 1
                qp.submit(name, args=(k, {1, 2}))
                k += 1
            jobs = [engine.Job(n, args=(k + j,), priority=j) for j, n in enumerate(["t.remote", "t.none"] * 20)]
            assert not q.submit_batch(jobs, on_duplicate="reject").rejected
            k += len(jobs)
        return dict(_became(q, q, 10), turns=turns)


def test_the_c_turn_stores_and_shows_what_the_python_turn_does(tmp_path, monkeypatch):
    c = _submit_mix(str(tmp_path / "c.db"), 1, monkeypatch)
    monkeypatch.undo()
    py = _submit_mix(str(tmp_path / "py.db"), 0, monkeypatch)
    assert sum(n for n, _ in c["turns"]) == len(c["rows"]) == 147, "every submit went through the C turn"
    assert py["turns"] == []
    for what in ("rows", "events", "live", "heads"):
        assert c[what] == py[what], what
    # The limits a submitter left unset came from the definition a worker registered.
    remote = [r for r in c["rows"] if r[0] == "t.remote"]
    assert {(r[7], r[8] != 0) for r in remote} == {(3500, True)} and {r[5] for r in remote} >= {7}


def _spy_parts(monkeypatch: pytest.MonkeyPatch, w: Any) -> List[Tuple[int, int, int]]:
    """(jobs inserted so far, stopped, SQLite error) of every streamed part the C turn took."""
    seen: List[Tuple[int, int, int]] = []
    if w.native is None:
        return seen
    real = w.native.part

    def part(*a: Any) -> Any:
        out = real(*a)
        seen.append((out.items, out.stopped, out.sql_rc))
        return out
    monkeypatch.setattr(w.native, "part", part)
    return seen


def _stream_by_hand(q: engine.Queue, parts: List[List[engine.Job]], taken: Any) -> List[int]:
    """Send `parts` as one request in parts, as submit_batch does, letting
    the writer take each part (`taken(k)`: it has the first k) before the
    next is written; returns the ids."""
    created = shm.now_us()
    frames, ids = [], []
    for jobs in parts:
        first = q.seg.reserve_ids(len(jobs))
        items = [(first + k,) + q._item(j.name, j.args, {}, j.priority, None, j.max_attempts, created,
                                         created + int(j.delay * 1e6) if j.delay else 0, j.group, None, j.tags)[1:]
                 for k, j in enumerate(jobs)]
        frames.append(protocol.encode_frame(0, items))
        ids += [it[0] for it in items]
    pos = q._reserve(sum(map(len, frames)) + 64, len(ids))
    off = 0
    for k, f in enumerate(frames):
        q.seg.req_write(pos, f, off)
        off += len(f)
        q.seg.req_stream(pos, off)
        taken(k + 1)
    q.seg.req_publish(pos, off)
    kinds, flat = protocol.decode_answer(q._await_answer(pos))
    assert list(kinds) == [0] * len(ids) and list(flat[0::2]) == ids
    return ids


def _stream_mix(db: str, native: int, monkeypatch: pytest.MonkeyPatch) -> Dict[str, Any]:
    """Batches of plain jobs (defined here, defined only by another
    process's worker, not defined at all; delayed, prioritised, with attempt
    limits; JSON and pickle), sent in parts by hand and by submit_batch, and
    what became of them."""
    with _mix_queues(db, native) as (iw, q, qp):
        parts = _spy_parts(monkeypatch, iw.w)
        turns = _spy(monkeypatch, iw.w)
        names = ("t.remote", "t.local", "t.none")

        def jobs(lo: int, n: int) -> List[engine.Job]:
            return [engine.Job(names[k % 3], args=(k, "x" * (k % 50)), priority=k % 7,
                               max_attempts=k % 4 or None, delay=3600 if k % 5 == 0 else None)
                    for k in range(lo, lo + n)]

        def taken(base: int) -> Any:  # the C turn took part k (the Python turn: a moment to)
            def wait(k: int) -> None:
                if native:
                    wait_for(lambda: len(parts) >= base + k, what=f"part {k} taken")
                else:
                    time.sleep(0.02)
            return wait
        _stream_by_hand(q, [jobs(0, 64), jobs(64, 200), jobs(264, 336)], taken(0))
        _stream_by_hand(qp, [jobs(600, 100), jobs(700, 100)], taken(3))
        for qq, lo, n in ((q, 800, 2500), (qp, 3300, 700)):  # in whole, or in parts: as it comes
            out = qq.submit_batch(jobs(lo, n))
            assert len(out.inserted) == n and out.inserted == sorted(out.inserted)
        return dict(_became(q, qp, 5000), parts=parts, turns=turns)


def test_the_c_turn_stores_a_streamed_batch_as_the_python_turn_does(tmp_path, monkeypatch):
    c = _stream_mix(str(tmp_path / "c.db"), 1, monkeypatch)
    monkeypatch.undo()
    py = _stream_mix(str(tmp_path / "py.db"), 0, monkeypatch)
    assert py["parts"] == [] and py["turns"] == []
    assert c["parts"][:5] == [(64, 0, 0), (264, 0, 0), (600, 0, 0), (100, 0, 0), (200, 0, 0)], \
        "the C turn took each part as it came"
    by_c = 600 + 200 + sum(n for n, _ in c["turns"]) + sum(
        n for (n, _, _), nxt in zip(c["parts"][5:], c["parts"][6:] + [(0, 0, 0)]) if nxt[0] <= n)
    assert by_c == len(c["rows"]) == 4000, "every job went through the C turn, in whole or in parts"
    assert all(stopped == shm.lib.HR_TURN_END for _, stopped, _ in c["parts"])
    assert c["fifo"] and py["fifo"]
    for what in ("rows", "events", "live", "heads"):
        assert c[what] == py[what], what
    assert len(c["heads"]) == 4000 - 800, "all but the delayed ones run now"


def test_a_streamed_batch_the_c_turn_cannot_finish_is_stored_whole(db, monkeypatch):
    """A later part the C turn does not take (a job with tags), or more jobs
    than the segment has room for: the C turn's work is rolled back and the
    request is stored whole by the Python turn, in order, with nothing lost."""
    with writer_in_process(db, capacity=1500) as iw, engine.Queue(db) as q:
        parts = _spy_parts(monkeypatch, iw.w)

        def taken(k: int) -> None:
            wait_for(lambda: len(parts) >= k, what=f"part {k} looked at")
        tagged = [engine.Job("t", args=(k,), tags={"k": str(k)} if k == 900 else None) for k in range(1000)]
        ids = _stream_by_hand(q, [tagged[:500], tagged[500:]], taken)
        assert [p[1] for p in parts] == [shm.lib.HR_TURN_END, shm.lib.HR_TURN_OTHER]
        assert q.reader.conn.execute("SELECT id, k, v FROM tags").fetchall() == [(ids[900], "k", "900")]
        parts.clear()
        big = [engine.Job("t", args=(1000 + k,), priority=k % 2) for k in range(1000)]  # 500 beyond the room
        _stream_by_hand(q, [big[:500], big[500:]], taken)
        assert [p[1] for p in parts] == [shm.lib.HR_TURN_END, shm.lib.HR_TURN_OTHER], "no room for the second"
        assert q.reader.conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 2000
        order: List[int] = []
        while len(order) < 2000:  # the spilled ones come back as slots free up
            jobs = q.claim(max=100, timeout=5)
            assert jobs, f"{len(order)} of 2000 claimed"
            order += [j.args[0] for j in jobs]
            assert all(j.complete() for j in jobs)
        odd, even = ([1000 + k for k in range(r, 1000, 2)] for r in (1, 0))
        assert order == odd + list(range(1000)) + even, "by priority, then FIFO, across the spill"


def test_a_full_database_refuses_a_c_turn_and_nothing_of_it_is_stored(db, monkeypatch):
    """The C turn rolls back a failed statement and hands the turn to Python,
    which meets the same error and refuses the submit with a typed error;
    nothing accepted before is lost, and submits work once there is room."""
    with writer_in_process(db, upkeep=False) as iw, engine.Queue(db) as q:
        turns = _spy(monkeypatch, iw.w)
        before = [q.submit("t", args=(i,)) for i in range(20)]
        pages = iw.w.store.conn.execute("PRAGMA page_count").fetchall()[0][0]
        iw.w.store.conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(errors.StoreFull, match="nothing of it was stored"):
            q.submit("t", args=("x" * 20000,))  # more pages than the file may grow by
        assert turns[-1] == (0, apsw.SQLITE_FULL)
        iw.w.store.conn.execute("PRAGMA max_page_count = 1073741823")
        after = q.submit("t", args=("after",))
        assert turns[-1] == (1, 0)
        stored = [r[0] for r in q.reader.conn.execute("SELECT id FROM tasks ORDER BY id")]
        assert stored == before + [after]
        got = sorted(j.id for j in q.claim(max=50, timeout=5))
        assert got == before + [after]


def test_a_malformed_plain_request_is_refused_and_the_writer_carries_on(db):
    item = (0, "t", b"[[1],{}]", 0, 0, None, 0, 0, None, 1, 0, 0, None, None)
    with engine.Queue(db) as q:
        good = protocol.encode_request(0, [(q.seg.reserve_ids(1),) + item[1:]])
        assert good[:4] == b"HRB1"
        for junk in (good[:-3], good[:16] + b"\x00" * 40, good + b"x"):
            with pytest.raises(errors.SubmitFailed, match="malformed"):
                protocol.decode_answer(send_raw(q, junk))
        tid = q.submit("t", args=(1,))
        assert [j.id for j in q.claim(max=1, timeout=5)] == [tid]


def test_plain_requests_decode_to_the_items_they_carry():
    items = [(7 + k, name, body, ser, prio, None, run_at, attempts, None, 1_700_000_000_000_000 + k, timeout, bo,
              None, None)
             for k, (name, body, ser, prio, run_at, attempts, timeout, bo) in enumerate([
                 ("t", b"", 0, 0, 0, 0, protocol.UNSET, protocol.UNSET),
                 ("é.名", os.urandom(300), 1, 255, 1 << 52, 10, 0, 0),
                 ("x" * 200, b"\x00" * 5, 0, 3, 5, 1, 2 ** 32 - 1, shm.pack_backoff(0x83, 2 ** 28 - 1, 2 ** 28 - 1)),
             ])]
    data = protocol.encode_request(2, items)
    assert data[:4] == b"HRB1"
    assert protocol.decode_request(data) == (2, items)
    # Anything but plain jobs, and every replay, still travels as marshal.
    for mode, its in ((protocol.REPLAY, items), (0, [items[0][:5] + (b"k" * 16,) + items[0][6:]])):
        assert protocol.encode_request(mode, its)[:4] != b"HRB1"
        assert protocol.decode_request(protocol.encode_request(mode, its)) == (mode, its)


def test_a_backoff_capped_at_days_is_stored_by_both_turns_and_the_writer_lives(tmp_path, monkeypatch):
    """A cap of 2**27 ms (37 hours) or more sets the packed backoff's top bit:
    it is stored as a signed 64-bit value by either turn, and a worker's
    definition of it does not stop the writer."""
    days = Backoff.exponential(60, cap=3 * 86400)
    for native in (1, 0):
        db = str(tmp_path / f"b{native}.db")
        with writer_in_process(db, upkeep=False, native_turn=native, flush_interval=60.0) as iw:
            turns = _spy(monkeypatch, iw.w)
            with engine.Queue(db) as definer:
                @definer.task(name="t.days", timeout=5.0, backoff=days)
                def remote() -> None:
                    pass
                definer._define()
            with engine.Queue(db) as q:
                @q.task(name="t.local_days", backoff=days)
                def local() -> None:
                    pass
                ids = [q.submit("t.days"), local.submit()]
                stored = dict(q.reader.conn.execute("SELECT name, backoff FROM tasks").fetchall())
                assert all(shm.unpack_backoff(stored[n])[2] == 3 * 86400 * 1000 for n in ("t.days", "t.local_days"))
                assert sorted(j.id for j in q.claim(max=5, timeout=5)) == ids
            assert sum(n for n, _ in turns) == (2 if native else 0)
        monkeypatch.undo()


def test_a_producer_with_a_fault_site_armed_sends_plain_submits_of_its_true_size(db, monkeypatch):
    """An armed producer reserves room for the answer and publishes what it
    wrote: a packed request is read to its exact end, so the size must be its own."""
    monkeypatch.setitem(faults._armed, "chunk_sent", [10 ** 9, 0])  # armed, never reached
    with engine.Queue(db) as q:
        tid = q.submit("t", args=(1,))
        assert [j.id for j in q.claim(max=1, timeout=5)] == [tid]


@pytest.mark.parametrize("pages,bound", [(256, ("<", 8 << 20)), (10 ** 9, (">", 20 << 20))])
def test_the_writer_checkpoints_once_the_wal_holds_checkpoint_pages(tmp_path, pages, bound):
    """One-by-one submits write ~2 WAL pages (of 2 KiB) a commit: with the
    timer alone (here an hour) the WAL grows with every submit; with the page
    bound, a PASSIVE checkpoint lets SQLite start the WAL over and the file
    stays small."""
    db = str(tmp_path / "w.db")
    with writer_in_process(db, checkpoint_interval=3600.0, checkpoint_pages=pages) as iw, engine.Queue(db) as q:
        assert iw.w.native is not None
        assert q.reader.conn.execute("PRAGMA page_size").fetchone()[0] == store.PAGE_SIZE
        for i in range(6000):
            q.submit("t", args=(i,))
        size = os.path.getsize(db + "-wal")
    op, limit = bound
    assert (size < limit) if op == "<" else (size > limit), f"{size / 2 ** 20:.1f} MB of WAL"


def test_the_writer_stays_in_the_c_turn_loop_while_submits_keep_coming(db, monkeypatch):
    """One C call takes turn after turn, waiting for each next publish, so
    that one-by-one submits do not pass through the Python loop each."""
    with writer_in_process(db, flush_interval=60.0) as iw, engine.Queue(db) as q:
        calls = _spy(monkeypatch, iw.w)
        assert iw.w.native is not None
        ids = [q.submit("t", args=(i,)) for i in range(300)]
        wait_for(lambda: sum(n for n, _ in calls) == 300, what="every submit counted")
        assert len(calls) < 60, f"{len(calls)} C calls for 300 submits"
        assert sorted(j.id for j in q.claim(max=300, timeout=5)) == ids


def test_outcomes_reach_disk_on_time_while_submits_keep_the_writer_in_c(db):
    """The C turn loop hands the dirty ring's flush to Python when it is due,
    however busy the submits keep it: a completion is on disk within a few
    flush intervals, and a delayed task is promoted when its time comes."""
    with engine.Queue(db) as q:
        first = q.submit("t", args=("first",))
        later = q.submit("t", args=("later",), delay=0.3)
        (job,) = q.claim(max=1, timeout=5)
        assert job.id == first and job.complete()
        done_at = time.monotonic()
        flushed = None
        k = 0
        while time.monotonic() - done_at < 1.0:
            q.submit("t", args=(k,), priority=0)
            k += 1
            if flushed is None and q.reader.conn.execute(
                    "SELECT count(*) FROM outcomes WHERE id = ? AND state = ?", (first, shm.COMPLETED)).fetchone()[0]:
                flushed = time.monotonic() - done_at
        assert flushed is not None and flushed < 0.25, f"flushed after {flushed} s ({k} submits meanwhile)"
        assert q.get(later).state == "pending", "promoted while the submits went on"


def _submit_events(q: engine.Queue) -> List[Tuple[str, int, int]]:
    return [(e.kind, e.id, e.count) for e in q.events(follow=False) if e.kind in ("submitted", "batch_submitted")]


def _event_rows(q: engine.Queue) -> int:
    return q.reader.conn.execute("SELECT count(*) FROM events").fetchone()[0]


def test_one_by_one_submit_events_are_held_then_written_once_each_in_order(db, tmp_path):
    """A one-by-one submit's commit holds its event back (the commit writes
    the tasks' and payloads' pages only); the held events are written
    together once `event_delay` passes, and a batch's event comes after the
    held ones that were committed before it."""
    with engine.Queue(db, event_delay=1.0) as q:
        ids = [q.submit("t", args=(i,)) for i in range(40)]
        assert _event_rows(q) == 0, "held, not written"
        held_at = time.monotonic()
        wait_for(lambda: _event_rows(q) == 40, timeout=10, what="the held events written")
        assert time.monotonic() - held_at > 0.5, "written before their delay"
        assert _submit_events(q) == [("submitted", i, 1) for i in ids]
        more = [q.submit("t", args=(i,)) for i in range(5)]
        out = q.submit_batch([engine.Job("t", args=(i,)) for i in range(3)])
        # The batch's commit writes an event anyway: the held ones go with it, first.
        assert _submit_events(q)[40:] == [("submitted", i, 1) for i in more] + [("batch_submitted",
                                                                                 out.inserted[0], 3)]
    with engine.Queue(str(tmp_path / "unheld.db"), event_delay=0.0) as q:  # a writer of its own
        tid = q.submit("t", args=("not held",))
        assert _submit_events(q)[-1] == ("submitted", tid, 1)


def test_a_clean_stop_writes_the_events_still_held(db):
    with engine.Queue(db, event_delay=3600.0, idle_exit=0.1) as q:
        ids = [q.submit("t", args=(i,)) for i in range(10)]
        assert _event_rows(q) == 0
    wait_for(lambda: not paths.writer_alive(db), what="the writer gone")
    with engine.Queue(db) as q:
        assert _submit_events(q) == [("submitted", i, 1) for i in ids]


def test_events_held_by_a_killed_writer_are_written_by_the_next_once_each(db):
    """kill -9 while the C turn holds events of committed submits: the next
    writer finds the tasks from the events' horizon that have no event and
    writes theirs; those that had one (a batch's, the held ones a batch
    wrote) are not written twice."""
    with engine.Queue(db, event_delay=3600.0) as q:
        first = [q.submit("t", args=(i,)) for i in range(20)]
        batch = q.submit_batch([engine.Job("t", args=(i,)) for i in range(3)]).inserted
        held = [q.submit("t", args=(i,)) for i in range(7)]
        assert _event_rows(q) == 21, "the batch wrote the 20 held before it, and its own"
        kill_writer(db)
        wait_for(lambda: not paths.writer_alive(db), what="writer dead")
        q._refresh()
        q._command("sync", ([],))  # answered once the new writer serves
        assert _submit_events(q) == ([("submitted", i, 1) for i in first] + [("batch_submitted", batch[0], 3)] +
                                     [("submitted", i, 1) for i in held])
        created = dict(q.reader.conn.execute("SELECT id, created FROM tasks"))
        assert [e.at for e in q.events(follow=False)][-7:] == [created[i] / 1e6 for i in held]
        kill_writer(db)  # again, with nothing held: nothing is written twice
        wait_for(lambda: not paths.writer_alive(db), what="writer dead")
        q._refresh()
        q._command("sync", ([],))
        assert len(_submit_events(q)) == 28


def test_the_writer_syncs_the_wal_while_commits_write_it_and_not_when_idle(db, monkeypatch):
    """WalSync flushes the WAL file as it grows, so that a checkpoint does
    not have the whole of it to sync while no submit commits; an idle WAL
    is left alone."""
    synced: List[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with writer_in_process(db) as iw, engine.Queue(db) as q:
        assert iw.w.wal_sync is not None
        for i in range(300):
            q.submit("t", args=(i,))
        wait_for(lambda: iw.w.wal_sync.syncs > 0, timeout=10, what="a sync of the WAL")
        assert synced and set(synced) == {os.path.realpath(db) + "-wal"}
        time.sleep(0.5)  # the last commits synced, upkeep's totals written
        idle = iw.w.wal_sync.syncs
        time.sleep(0.5)
        assert iw.w.wal_sync.syncs == idle, "synced a WAL nobody wrote"
        q.submit("t", args=("more",))
        wait_for(lambda: iw.w.wal_sync.syncs > idle, timeout=10, what="a sync after a new commit")


def test_each_task_of_a_batch_whose_ids_are_not_one_run_has_one_submit_event(db, monkeypatch):
    """A streamed batch's parts take their ids one part at a time, so another
    producer's ids may come between them, and a batch with duplicates skips
    the ids of those: the log has one event per run of consecutive ids, and
    each task is in exactly one event."""
    real = shm.Segment.reserve_ids

    def reserve_ids(self: shm.Segment, n: int) -> int:
        real(self, 1)  # another producer's id comes first
        return real(self, n)
    with engine.Queue(db) as q:
        monkeypatch.setattr(shm.Segment, "reserve_ids", reserve_ids)
        streamed = q.submit_batch([engine.Job("t", args=(i,)) for i in range(1000)]).inserted
        monkeypatch.undo()
        assert len(streamed) == 1000 and streamed != list(range(streamed[0], streamed[0] + 1000))
        q.submit("t", args=("first",), dedup_key="k1")
        deduped = q.submit_batch([engine.Job("t", args=(k,), dedup_key=k) for k in ("a", "k1", "b", "c")]).inserted
        assert len(deduped) == 3 and deduped[1] - deduped[0] == 2  # the skipped job's id lies between
        tasks = {r[0] for r in q.reader.conn.execute("SELECT id FROM tasks")}
        covered: Dict[int, int] = {}

        def count() -> Dict[int, int]:
            covered.clear()
            for e in q.events(follow=False):
                if e.kind in ("submitted", "batch_submitted"):
                    for tid in range(e.id, e.id + e.count):
                        covered[tid] = covered.get(tid, 0) + 1
            return covered
        wait_for(lambda: len(count()) >= len(tasks), timeout=10, what="every submit event")
        assert set(covered) == tasks and set(covered.values()) == {1}
        batch_events = [e for e in q.events(follow=False) if e.kind == "batch_submitted"]
        assert len(batch_events) > 2, "one per run of consecutive ids"
