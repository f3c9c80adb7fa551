"""The SQLite store on its own: schema migrations and the spill partitions."""
from __future__ import annotations

import apsw

from engine.store import SQLiteStore

_V2_SPILL = """
DROP TABLE spill;
CREATE TABLE spill(nprio INTEGER NOT NULL, seq INTEGER NOT NULL, id INTEGER NOT NULL,
                   PRIMARY KEY(nprio, seq)) WITHOUT ROWID;
CREATE INDEX spill_id ON spill(id);
"""


def _task(tid: int, prio: int, grp: str = None):
    # id, name, prio, seq, created, run_at, dedup, grp, max_attempts, ser, timeout_ms, backoff
    return (tid, "t", prio, tid, 0, 0, None, grp, 1, 0, 0, 0)


def test_schema_2_spill_migrates_into_gates(tmp_path):
    """A database whose spill table predates gates: on open, the backlog of
    a limited group moves to its gate and the rest keeps its rank order."""
    db = str(tmp_path / "q.db")
    store = SQLiteStore(db)
    with store.transaction():
        store.put_group("limited", 1, 2)
        store.put_group("free", 2, 0)
        store.insert_tasks([_task(1, 5), _task(2, 9, "limited"), _task(3, 7, "free"), _task(4, 9, "limited")],
                           [(i, b"{}") for i in range(1, 5)])
    store.close()
    conn = apsw.Connection(db)
    conn.execute(_V2_SPILL)
    conn.executemany("INSERT INTO spill(nprio, seq, id) VALUES(?,?,?)",
                     [(255 - p, tid, tid) for tid, p in [(1, 5), (2, 9), (3, 7), (4, 9)]])
    conn.execute("UPDATE meta SET v = 2 WHERE k = 'schema_version'")
    conn.close()

    store = SQLiteStore(db)
    assert store.meta_get("schema_version") == 3
    assert store.spill_count() == 4
    assert store.spill_gates() == {1: 2}
    assert store.spill_best() == (7, 3)
    with store.transaction():
        assert [r[0] for r in store.spill_take(10)] == [3, 1]
        assert [r[0] for r in store.spill_take(10, gate=1)] == [2, 4]
    assert store.spill_count() == 0
    store.close()


def test_spill_remove_and_regate(tmp_path):
    store = SQLiteStore(str(tmp_path / "q.db"))
    with store.transaction():
        store.put_group("g", 3, 0)
        store.insert_tasks([_task(1, 1, "g"), _task(2, 1, "g"), _task(3, 1)], [(i, b"{}") for i in (1, 2, 3)])
        store.spill_add([(1, 1, 1, 0), (1, 2, 2, 0), (1, 3, 3, 0)])
        store.spill_regate("g", 3)
        assert store.spill_gates() == {3: 2}
        assert store.spill_remove(2) == 3
        assert store.spill_remove(2) is None
        assert store.spill_remove(3) == 0
        store.spill_regate("g", 0)
        assert store.spill_gates() == {}
        assert store.spill_ranks(5) == [(1, 1)]
    store.close()


def test_readers_do_not_map_the_database_and_cannot_write(tmp_path):
    """Readers (producers, workers) read pages rather than map the file:
    SQLite unmaps a mapping whenever another connection commits, so each
    claim after a writer's commit paid an munmap, an mmap and page faults
    (python benches/probe.py drain 60000: 94k/s mapped, 108k/s not).  They never write."""
    from engine.store import Reader
    path = str(tmp_path / "q.db")
    SQLiteStore(path).close()
    r = Reader(path)
    try:
        assert r.conn.pragma("mmap_size") == 0
        try:
            r.conn.execute("CREATE TABLE x(a)")
        except apsw.ReadOnlyError:
            pass
        else:
            raise AssertionError("a reader wrote")
    finally:
        r.close()


def test_a_new_database_gets_the_page_size_and_one_that_exists_keeps_its_own(tmp_path, monkeypatch):
    from engine import store as store_mod

    def page_size(db: str) -> int:
        s = SQLiteStore(db)
        try:
            return s.conn.execute("PRAGMA page_size").fetchone()[0]
        finally:
            s.close()

    new = str(tmp_path / "new.db")
    assert page_size(new) == store_mod.PAGE_SIZE == 2048
    monkeypatch.setattr(store_mod, "PAGE_SIZE", 4096)
    old = str(tmp_path / "old.db")
    assert page_size(old) == 4096  # made by an older headrace, at SQLite's default
    monkeypatch.undo()
    s = SQLiteStore(old)
    assert s.conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    with s.transaction():
        s.insert_tasks([_task(1, 5)], [(1, b"{}")])
    assert [r[0] for r in s.conn.execute("SELECT id FROM tasks")] == [1]
    s.close()


def test_spill_take_gives_each_task_s_live_row_as_the_outcome_log_says(tmp_path):
    """spill_take takes the best-ranked spilled tasks, and only them (one
    range delete), each with its live row: the last attempt, a delayed
    retry's run-at, and an attempt limit counted from the attempts used
    before a put-back from dead."""
    from engine import store as st
    s = SQLiteStore(str(tmp_path / "q.db"))
    # id, name, prio, seq, created, run_at, dedup, grp, max_attempts, ser, timeout_ms, backoff
    tasks = [(tid, "t", tid % 3, tid, 0, 1000 + tid, None, None, tid % 4, 0, tid % 5, 0) for tid in range(1, 41)]
    # (id, attempt, state, at, info): 1 pending (put back; info: attempts used), 2 delayed (info: run-at)
    outcomes = [(3, 1, 2, 10, 5_000), (5, 1, 2, 10, 6_000), (5, 2, 1, 11, None), (7, 1, 1, 10, None),
                (9, 2, 1, 12, 2), (9, 3, 2, 13, 7_000), (11, 4, 1, 14, 3), (11, 5, 1, 15, 1), (13, 1, 2, 16, None),
                (30, 1, 2, 10, 9_000), (31, 2, 1, 10, 4)]
    with s.transaction():
        s.insert_tasks(tasks, [(t[0], b"{}") for t in tasks])
        s.record_outcomes(outcomes)
    want = {r[0]: r for r in s.conn.execute(
        f"SELECT t.id, t.prio, t.seq, {st._RUN_AT}, {st._LIVE_TAIL} FROM tasks t")}
    assert want[3][3] == 5_000 and want[9][5] == 3 and want[11][6] == 3 + 3  # the cases are there
    for ids in (range(1, 41), [1, 3, 5, 7, 9, 11, 13, 30, 31, 40], [40, 9, 2, 31, 3]):
        with s.transaction():
            s.spill_add([(want[i][1], want[i][2], i, 0) for i in ids])
        half = len(ids) // 2
        with s.transaction():
            got = s.spill_take(half)
        assert s.spill_count() == len(ids) - half  # exactly the ones taken left the spill store
        with s.transaction():
            got += s.spill_take(len(ids))
        assert s.spill_count() == 0
        assert sorted(got) == sorted(want[i] for i in ids)
        assert [r[0] for r in got] == [r[0] for r in sorted((want[i] for i in ids), key=lambda r: (-r[1], r[2]))]
    s.close()
