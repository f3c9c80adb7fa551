"""The writer's turn for plain submits in C (csrc/turn.c): it stores and
shows exactly what the Python turn does, hands over to it on anything it
does not take, and refuses nothing the Python turn would not refuse."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import apsw
import pytest

import engine
from engine import Backoff, errors, faults, protocol, shm
from engine_helpers import send_raw, writer_in_process

#: The columns a submit decides (not id, seq or created: those differ between runs).
_COLS = "t.name, t.prio, t.run_at > 0, t.dedup, t.grp, t.max_attempts, t.ser, t.timeout_ms, t.backoff, p.body"


def _spy(monkeypatch: pytest.MonkeyPatch, w: Any) -> List[Tuple[int, int]]:
    """(items committed, SQLite error) of every C turn that did something."""
    seen: List[Tuple[int, int]] = []
    if w.native is None:
        return seen
    real = w.native.run

    def run(*a: Any) -> Any:
        out = real(*a)
        if out.items or out.sql_rc:
            seen.append((out.items, out.sql_rc))
        return out
    monkeypatch.setattr(w.native, "run", run)
    return seen


def _submit_mix(db: str, native: int, monkeypatch: pytest.MonkeyPatch) -> Dict[str, Any]:
    """A mix of plain submits (one by one and in small batches; defined here,
    defined only by another process's worker, not defined at all; delayed,
    prioritised, with attempt limits; JSON and pickle), and what became of it."""
    # No flush comes due (the C turn leaves a due flush to the Python turn).
    with writer_in_process(db, upkeep=False, native_turn=native, flush_interval=60.0) as iw:
        turns = _spy(monkeypatch, iw.w)
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
            rows = q.reader.conn.execute(f"SELECT {_COLS}, t.id FROM tasks t JOIN payloads p ON p.id = t.id"
                                         " ORDER BY t.id").fetchall()
            events = q.reader.conn.execute("SELECT kind, n FROM events ORDER BY seq").fetchall()
            live = [(i.state, i.priority, i.max_attempts, i.run_at is not None)
                    for i in map(q.get, [r[-1] for r in rows])]
            heads = [(j.args[0], j.attempt) for j in q.claim(max=10, timeout=5)]
    return {"rows": [r[:-1] for r in rows], "events": events, "live": live, "heads": heads, "turns": turns}


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
    """One-by-one submits write ~3 WAL pages a commit: with the timer alone
    (here an hour) the WAL grows with every submit; with the page bound, a
    PASSIVE checkpoint lets SQLite start the WAL over and the file stays small."""
    db = str(tmp_path / "w.db")
    with writer_in_process(db, checkpoint_interval=3600.0, checkpoint_pages=pages) as iw, engine.Queue(db) as q:
        assert iw.w.native is not None
        for i in range(3000):
            q.submit("t", args=(i,))
        size = os.path.getsize(db + "-wal")
    op, limit = bound
    assert (size < limit) if op == "<" else (size > limit), f"{size / 2 ** 20:.1f} MB of WAL"
