"""The durable record: what the writer does with the database, behind one interface.

SQLite is the truth; the shared-memory segment is a cache of the live set.
Everything the writer does to the database goes through :class:`Store`, so
that a PostgreSQL store for many machines can stand in later.

The schema keeps a task's life to appended rows:

- ``tasks`` (metadata) and ``payloads`` (blobs) are insert-only;
- ``outcomes`` is a log of (task, attempt, state, time, info); a task is live
  while its last outcome is not terminal (a dead task put back to work gets
  a pending row after its dead one);
- ``results`` holds what an attempt left behind: a return value or an error,
  keyed by (task, attempt), so a stale attempt's row never passes for the
  current one;
- ``spill`` holds the live tasks that do not fit in the segment, keyed by
  gate (0, or a limited group whose backlog exceeds its share of the
  segment), then rank (priority descending, then FIFO sequence) - the only
  ordered index on the hot path;
- ``counters`` keeps running totals, so that stats need no table scan.
"""
from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apsw

from . import _core, errors, faults, protocol
from ._core import ffi, lib
from .errors import check

#: Schema version written into a new database; a newer one is refused.
SCHEMA_VERSION = 3
#: Milliseconds a connection waits on a busy database before it gives up.
BUSY_TIMEOUT_MS = 10_000

# Task states as stored (the same numbers as the segment's states).
PENDING, DELAYED, WAITING, RUNNING, COMPLETED, DEAD, CANCELLED = 1, 2, 3, 4, 5, 6, 7
TERMINAL_MIN = COMPLETED

#: One row of ``tasks``: (id, name, prio, seq, created, run_at, dedup, grp, max_attempts, ser,
#: timeout_ms, backoff)
TaskRow = Tuple[int, str, int, int, int, int, Optional[bytes], Optional[str], int, int, int, int]
#: One row of ``results``: (id, attempt, kind, body); kind 0 is a return value, 1 an error.
ResultRow = Tuple[int, int, int, bytes]
RESULT, ERROR = 0, 1
#: (id, attempt, state, at_us, info)
OutcomeRow = Tuple[int, int, int, int, Optional[bytes]]
#: What the segment needs to hold a live task:
#: (id, prio, seq, run_at, dedup, attempt, max_attempts, timeout_ms, backoff, group name)
LiveRow = Tuple[int, int, int, int, Optional[bytes], int, int, int, int, Optional[str]]
#: A spilled task: (prio, seq, id, gate).
SpillRow = Tuple[int, int, int, int]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    prio INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    created INTEGER NOT NULL,
    run_at INTEGER NOT NULL,
    dedup BLOB,
    grp TEXT,
    max_attempts INTEGER NOT NULL,
    ser INTEGER NOT NULL,
    timeout_ms INTEGER NOT NULL DEFAULT 0,
    backoff INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_dedup ON tasks(dedup) WHERE dedup IS NOT NULL;
CREATE TABLE IF NOT EXISTS payloads(id INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outcomes(
    id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    state INTEGER NOT NULL,
    at INTEGER NOT NULL,
    info BLOB
);
CREATE INDEX IF NOT EXISTS outcomes_id ON outcomes(id);
CREATE TABLE IF NOT EXISTS spill(
    gate INTEGER NOT NULL,
    nprio INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY(gate, nprio, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spill_id ON spill(id);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_grp ON tasks(grp) WHERE grp IS NOT NULL;
CREATE TABLE IF NOT EXISTS groups(
    name TEXT PRIMARY KEY,
    idx INTEGER NOT NULL UNIQUE,
    lim INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tags(
    k TEXT NOT NULL,
    v TEXT NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY(k, v, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_id ON tags(id);
CREATE TABLE IF NOT EXISTS deps(
    parent INTEGER NOT NULL,
    child INTEGER NOT NULL,
    PRIMARY KEY(parent, child)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deps_child ON deps(child);
CREATE TABLE IF NOT EXISTS waiting(
    child INTEGER PRIMARY KEY,
    remaining INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    id INTEGER NOT NULL,
    n INTEGER NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS definitions(
    name TEXT PRIMARY KEY,
    max_attempts INTEGER NOT NULL,
    timeout_ms INTEGER NOT NULL,
    backoff INTEGER NOT NULL,
    every_us INTEGER NOT NULL DEFAULT 0,
    cron TEXT NOT NULL DEFAULT '',
    prio INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results(
    id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    body BLOB,
    PRIMARY KEY(id, attempt)
) WITHOUT ROWID;
"""

#: Schema 1 -> 2: per-task timeout and retry backoff (the results table is new).
_MIGRATE_1 = """
ALTER TABLE tasks ADD COLUMN timeout_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN backoff INTEGER NOT NULL DEFAULT 0;
"""
#: Schema 3: the spill store is partitioned by gate (see Store.spill_add).
_MIGRATE_2 = """
CREATE TABLE spill3(gate INTEGER NOT NULL, nprio INTEGER NOT NULL, seq INTEGER NOT NULL, id INTEGER NOT NULL,
                    PRIMARY KEY(gate, nprio, seq)) WITHOUT ROWID;
INSERT INTO spill3 SELECT COALESCE((SELECT g.idx FROM tasks t JOIN groups g ON g.name = t.grp
                                    WHERE t.id = s.id AND g.lim > 0), 0), s.nprio, s.seq, s.id FROM spill s;
DROP TABLE spill;
ALTER TABLE spill3 RENAME TO spill;
CREATE INDEX spill_id ON spill(id);
"""


_INSERT_TASK = ("INSERT INTO tasks(id,name,prio,seq,created,run_at,dedup,grp,max_attempts,ser,timeout_ms,backoff) "
                "VALUES(?,?,?,?,?,?,?,?,?,?,?,?)")
_INSERT_PAYLOAD = "INSERT INTO payloads(id,body) VALUES(?,?)"
_INSERT_EVENT = "INSERT INTO events(kind,id,n,at) VALUES(?,?,?,?)"
#: The events' horizon: every committed task whose FIFO sequence is below it
#: has its submit event (the C turn holds one-by-one submits' events for a
#: moment, to write many at once; see repair_events).
_EVENTS_HORIZON = "INSERT OR REPLACE INTO meta(k, v) VALUES('events_seq', ?)"
#: A task's last attempt from the outcome log (0 if it never started); `t` is the task row.
_LAST_ATTEMPT = "COALESCE((SELECT max(attempt) FROM outcomes o WHERE o.id = t.id), 0)"
#: Attempts a task used before it was last put back from dead (a pending
#: outcome whose info is that count); its limit counts from there.
_ATTEMPT_BASE = ("COALESCE((SELECT max(info) FROM outcomes v WHERE v.id = t.id AND v.state = 1"
                 " AND v.info IS NOT NULL), 0)")
#: A task's attempt limit, 0 while unset (its worker's definition decides).
_MAX_ATTEMPTS = f"CASE WHEN t.max_attempts > 0 THEN t.max_attempts + {_ATTEMPT_BASE} ELSE 0 END"
#: The last outcome's state of task t (NULL: none yet).
_LAST_STATE = "(SELECT o.state FROM outcomes o WHERE o.id = t.id ORDER BY o.rowid DESC LIMIT 1)"
#: When task t may run: a backoff delay's run-at (a delayed outcome's info), else its submitted one.
_RUN_AT = ("COALESCE((SELECT CASE WHEN o.state = 2 THEN o.info END FROM outcomes o WHERE o.id = t.id"
           " ORDER BY o.rowid DESC LIMIT 1), t.run_at)")
#: The live-row columns of task t, after its id, prio and seq.
_LIVE_TAIL = f"t.dedup, {_LAST_ATTEMPT}, {_MAX_ATTEMPTS}, t.timeout_ms, t.backoff, t.grp"


# ---- connection settings: each a named function applied on connect ---------

def set_busy_timeout(conn: apsw.Connection) -> None:
    """Wait for a busy database instead of failing at once."""
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)


#: Page size of a new database (bytes).  A one-by-one submit's commit writes
#: two whole pages to the WAL (its task's and its payload's leaf), and every
#: byte of them is written again to the file and synced; SQLite's default is
#: 4096.
PAGE_SIZE = 2048


def set_page_size(conn: apsw.Connection) -> None:
    """A new database's page size (one that exists keeps its own)."""
    conn.pragma("page_size", PAGE_SIZE)


def set_wal(conn: apsw.Connection) -> None:
    """Write-ahead logging: readers never block the writer, nor it them."""
    mode = conn.pragma("journal_mode", "wal")
    if str(mode).lower() != "wal":
        raise errors.StoreError(f"{conn.filename}: cannot switch to WAL mode (got {mode!r})")


def set_synchronous(level: str):
    """`normal` survives a process crash; `full` also survives power loss."""
    if level not in ("normal", "full"):
        raise errors.InvalidArgument(f"sync must be 'normal' or 'full', got {level!r}")

    def apply(conn: apsw.Connection) -> None:
        conn.pragma("synchronous", level)
    apply.__name__ = f"set_synchronous_{level}"
    return apply


def disable_autocheckpoint(conn: apsw.Connection) -> None:
    """The writer owns checkpoints (PASSIVE on a timer, TRUNCATE as a backstop)."""
    conn.wal_autocheckpoint(0)


def set_cache(conn: apsw.Connection) -> None:
    """A larger page cache for the writer's index pages (32 MiB)."""
    conn.pragma("cache_size", -32768)


def set_no_mmap(conn: apsw.Connection) -> None:
    """Readers read pages rather than map the file, whatever SQLite's
    build default: SQLite unmaps the whole file whenever another connection
    has committed, so every claim after a writer's commit paid an munmap,
    an mmap and page faults (and pages still in the WAL are read() anyway)."""
    conn.pragma("mmap_size", 0)


def set_query_only(conn: apsw.Connection) -> None:
    """Readers can never write, even by mistake."""
    conn.pragma("query_only", True)


_RESTORE = "restore it from a backup, or move it aside to start an empty queue"


def store_error(path: str, e: apsw.Error, doing: str = "cannot open database") -> errors.StoreError:
    """The typed error for SQLite error `e` on database `path`."""
    if isinstance(e, apsw.NotADBError):
        return errors.StoreCorrupt(f"{path} is not a SQLite database ({e}); {_RESTORE}")
    if isinstance(e, apsw.CorruptError):
        return errors.StoreCorrupt(f"database {path} is corrupt ({e}); {_RESTORE}")
    return errors.StoreError(f"{doing} {path}: {e}")


def connect(path: str, settings: Sequence[Any], *, readonly: bool = False,
            vfs: Optional[str] = None) -> apsw.Connection:
    """Open `path` and apply each connection setting in order."""
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    try:
        conn = apsw.Connection(path, flags=flags, vfs=vfs) if vfs else apsw.Connection(path, flags=flags)
    except apsw.Error as e:
        raise store_error(path, e) from e
    try:
        for fn in settings:
            fn(conn)
    except BaseException as e:
        conn.close()
        if isinstance(e, apsw.Error):
            raise store_error(path, e) from e
        raise
    return conn


def check_identity(conn: apsw.Connection) -> None:
    """Refuse a SQLite database that headrace did not make (before anything
    changes it): one with tables but no headrace schema version."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return  # a new (empty) database
    version = None
    if "meta" in tables:
        try:
            version = conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchall()
        except apsw.SQLError:
            version = None
    if not version:
        raise errors.StoreCorrupt(
            f"{conn.filename} is a SQLite database but not a headrace one (it has tables "
            f"{', '.join(sorted(tables)[:5])} and no headrace schema version); refusing to change it. "
            "Give headrace a path of its own")


# ---- the store interface ------------------------------------------------------

class Store:
    """What the writer needs from durable storage.

    One writer calls the write methods, always inside :meth:`transaction`.
    Readers (producers, workers, the CLI) use :class:`Reader`.
    """

    def transaction(self) -> Any:
        """A context manager: one atomic commit."""
        raise NotImplementedError

    def insert_tasks(self, rows: Sequence[TaskRow], bodies: Sequence[Tuple[int, bytes]]) -> None:
        """Append new tasks and their (id, payload) rows."""
        raise NotImplementedError

    def existing(self, ids: Sequence[int]) -> List[int]:
        """Which of `ids` are already stored (a request replayed after a crash)."""
        raise NotImplementedError

    def record_outcomes(self, rows: Sequence[OutcomeRow]) -> None:
        """Append state changes; terminal ones end a task's life."""
        raise NotImplementedError

    def put_results(self, rows: Sequence[ResultRow]) -> None:
        """Store what attempts left behind (return values, errors)."""
        raise NotImplementedError

    def define(self, rows: Sequence[Tuple[Any, ...]]) -> None:
        """Record task definitions: (name, max_attempts, timeout_ms, backoff,
        every_us, cron, prio, next_at); the last four schedule periodic tasks."""
        raise NotImplementedError

    def definitions(self) -> Dict[str, Tuple[Any, ...]]:
        """name -> the rest of its :meth:`define` row."""
        raise NotImplementedError

    def set_next_runs(self, nexts: Dict[str, int]) -> None:
        """When each periodic task fires next."""
        raise NotImplementedError

    def finished_after(self, after_id: int, limit: int) -> List[Tuple[int, int, int]]:
        """(id, last state, its time) of the `limit` tasks after `after_id`, in id order."""
        raise NotImplementedError

    def log_submits(self, rows: Sequence[Tuple[int, int, int, int]]) -> None:
        """(kind, first id, count, time) per submit request, for the event stream."""
        raise NotImplementedError

    def purge_events(self, before_us: int, limit: int) -> None:
        """Drop those of the `limit` oldest submit events that are from before `before_us`."""
        raise NotImplementedError

    def repair_events(self, next_seq: int, lost: bool) -> int:
        """If events may be `lost` (a crash): write the submit event of every
        task from the events' horizon on that has none.  Then move the
        horizon to `next_seq`.  Returns how many were written."""
        raise NotImplementedError

    def oldest_event_at(self) -> int:
        """The time of the oldest submit event (a big number if there is none)."""
        raise NotImplementedError

    def oldest_outcome_at(self) -> Optional[int]:
        """The time of the oldest outcome stored (None if there is none)."""
        raise NotImplementedError

    def purge(self, ids: Sequence[int]) -> None:
        """Delete finished tasks and everything stored about them."""
        raise NotImplementedError

    def groups(self) -> Dict[str, Tuple[int, int]]:
        """Group name -> (index, limit)."""
        raise NotImplementedError

    def add_tags(self, rows: Sequence[Tuple[int, str, str]]) -> None:
        """(id, key, value) rows."""
        raise NotImplementedError

    def last_states(self, ids: Sequence[int]) -> Dict[int, int]:
        """id -> last stored state (0: none yet) of those of `ids` that exist."""
        raise NotImplementedError

    def wait_for(self, child: int, parents: Sequence[int]) -> None:
        """Make `child` wait until every one of `parents` completed."""
        raise NotImplementedError

    def parents_done(self, parents: Sequence[int]) -> List[int]:
        """Count completions of `parents`; returns the children that now wait on nothing."""
        raise NotImplementedError

    def waiting_children(self, parents: Sequence[int]) -> List[int]:
        """Still-waiting children of `parents` (to cancel with them); they stop waiting."""
        raise NotImplementedError

    def stop_waiting(self, tid: int) -> bool:
        """Take `tid` off the waiting list; False if it was not on it."""
        raise NotImplementedError

    def put_group(self, name: str, idx: int, limit: int) -> None:
        raise NotImplementedError

    def group_live(self, name: str) -> List[int]:
        """Ids of the tasks of group `name` that have not ended."""
        raise NotImplementedError

    def dead_ids(self, ids: Sequence[int]) -> List[Tuple[int, int, int]]:
        """(id, last attempt) of those of `ids` whose last outcome is dead."""
        raise NotImplementedError

    def tasks_for(self, ids: Sequence[int]) -> List[LiveRow]:
        """Live rows for `ids` as stored (to put dead tasks back)."""
        raise NotImplementedError

    def spill_add(self, rows: Iterable[SpillRow]) -> None:
        """Add (prio, seq, id, gate) to the spill store.  Gate 0 holds the
        tasks that rank behind everything in the segment; gate g > 0 the
        backlog of limited group g beyond its share of the segment."""
        raise NotImplementedError

    def spill_take(self, n: int, gate: int = 0) -> List[LiveRow]:
        """Remove and return the `n` best-ranked spilled tasks of `gate`."""
        raise NotImplementedError

    def spill_best(self) -> Optional[Tuple[int, int]]:
        """(prio, seq) of the best spilled task of gate 0, or None."""
        raise NotImplementedError

    def spill_count(self) -> int:
        raise NotImplementedError

    def spill_gates(self) -> Dict[int, int]:
        """Spilled tasks per gate above 0."""
        raise NotImplementedError

    def spill_ranks(self, n: int) -> List[Tuple[int, int]]:
        """(prio, seq) of the `n` best spilled tasks of gate 0, best first."""
        raise NotImplementedError

    def spill_find_dedup(self, dedup: bytes) -> Optional[int]:
        """The id of a spilled (live) task holding `dedup`, or None."""
        raise NotImplementedError

    def spill_remove(self, tid: int) -> Optional[int]:
        """Take task `tid` out of the spill store; returns its gate, or None if it was not there."""
        raise NotImplementedError

    def spill_regate(self, group: str, gate: int) -> None:
        """Move the spilled tasks of `group` to `gate` (its limit was set or lifted)."""
        raise NotImplementedError

    def spill_reset(self, rows: Iterable[SpillRow]) -> None:
        """Replace the whole spill store."""
        raise NotImplementedError

    def live(self) -> Iterator[LiveRow]:
        """Every non-terminal task, best rank first, with its last attempt."""
        raise NotImplementedError

    def max_id(self) -> int:
        raise NotImplementedError

    def meta_get(self, key: str, default: Any = None) -> Any:
        raise NotImplementedError

    def meta_set(self, key: str, value: Any) -> None:
        raise NotImplementedError

    def bump(self, counts: Dict[str, int]) -> None:
        """Add to running totals."""
        raise NotImplementedError

    def recount(self) -> None:
        """Recompute the running totals from the tables (after a crash)."""
        raise NotImplementedError


class _Reads:
    """Reads that the writer's store and the read-only Reader share."""

    conn: apsw.Connection

    def tagged(self, tags: Sequence[Tuple[str, str]]) -> List[int]:
        if not tags:
            return []
        q = " INTERSECT ".join(["SELECT id FROM tags WHERE k = ? AND v = ?"] * len(tags))
        return [r[0] for r in self.conn.execute(q + " ORDER BY 1", [x for kv in tags for x in kv])]

    def last_states(self, ids: Sequence[int]) -> Dict[int, int]:
        out: Dict[int, int] = {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            out.update(self.conn.execute(
                f"SELECT t.id, COALESCE({_LAST_STATE}, 0) FROM tasks t WHERE t.id IN ({','.join('?' * len(part))})",
                part))
        return out

    def waiting_count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM waiting").fetchall()[0][0]

    def waiting_ids(self) -> List[int]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT child FROM waiting")]

    def spill_ids(self) -> List[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM spill")]

    def quick_check(self) -> str:
        """SQLite's quick_check: "ok", or the first problems it found."""
        return "; ".join(str(r[0]) for r in self.conn.execute("PRAGMA quick_check(5)"))

    def counters(self) -> Dict[str, int]:
        return {k: v for k, v in self.conn.execute("SELECT name, n FROM counters")}

    def counters_at_flush(self) -> Tuple[Dict[str, int], int]:
        """The running totals and the writer's flush sequence, from one snapshot."""
        with self.conn:  # one read transaction: both from the same commit
            totals = self.counters()
            seq = self.meta_get("flush_seq", 0)
        return totals, int(seq)

    def events_after(self, seq: int, rowid: int, limit: int
                     ) -> Tuple[List[Tuple[int, int, int, int, int]], List[Tuple[int, int, int, int, int, Any]]]:
        """Submit events after `seq` (seq, kind, id, n, at) and outcome rows
        after `rowid` (rowid, id, attempt, state, at, info), oldest first,
        from one snapshot, and up to the same time: where one log has more
        than `limit` left, the other stops at its last row's time (so that
        merged by time, no outcome comes before its task's submit event)."""
        with self.conn:  # one read transaction: both logs from the same commit
            subs = list(self.conn.execute("SELECT seq, kind, id, n, at FROM events WHERE seq > ? ORDER BY seq"
                                          " LIMIT ?", (seq, limit)))
            outs = list(self.conn.execute("SELECT rowid, id, attempt, state, at, info FROM outcomes WHERE rowid > ?"
                                          " ORDER BY rowid LIMIT ?", (rowid, limit)))
        more_subs, more_outs = len(subs) == limit, len(outs) == limit
        # The log that ends later in time is cut to the other's end; the other
        # is kept whole, so that every call moves on.
        if subs and outs and (more_subs or more_outs):
            if more_subs and (not more_outs or subs[-1][4] <= outs[-1][4]):
                outs = list(itertools.takewhile(lambda o: o[4] <= subs[-1][4], outs))
            else:
                subs = list(itertools.takewhile(lambda s: s[4] <= outs[-1][4], subs))
        return subs, outs

    def is_waiting(self, tid: int) -> bool:
        return bool(self.conn.execute("SELECT 1 FROM waiting WHERE child = ?", (tid,)).fetchall())

    def spill_count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM spill").fetchall()[0][0]

    def meta_get(self, key: str, default: Any = None) -> Any:
        for (v,) in self.conn.execute("SELECT v FROM meta WHERE k = ?", (key,)):
            return v
        return default


class SQLiteStore(_Reads, Store):
    """The embedded default: one SQLite file in WAL mode, written by one process."""

    def __init__(self, path: str, sync: str = "normal") -> None:
        self.path = path
        self.conn = connect(path, [set_busy_timeout, check_identity, set_page_size, set_wal, set_synchronous(sync),
                                   disable_autocheckpoint, set_cache], vfs=faults.test_vfs())
        self._prepare()
        self._txn = _Txn(self.conn)
        self._native: Optional[NativeTurn] = None

    def _prepare(self) -> None:
        c = self.conn
        try:
            with c:
                c.execute(_SCHEMA)
                v = self.meta_get("schema_version")
                if v is None:
                    self.meta_set("schema_version", SCHEMA_VERSION)
                    return
                try:
                    version = int(v)
                except (TypeError, ValueError):
                    version = 0
                if version < 1 or isinstance(v, float) and v != version:
                    raise errors.StoreCorrupt(f"database {self.path} has an invalid schema version {v!r}; "
                                              f"{_RESTORE}")
                if version < SCHEMA_VERSION:
                    for script in (_MIGRATE_1, _MIGRATE_2)[version - 1:]:
                        c.execute(script)
                    self.meta_set("schema_version", SCHEMA_VERSION)
                elif version > SCHEMA_VERSION:
                    raise errors.SchemaMismatch(
                        f"database {self.path} has schema version {v}; this headrace reads up to "
                        f"{SCHEMA_VERSION}. Upgrade headrace to open it")
        except apsw.Error as e:
            raise store_error(self.path, e) from e

    def close(self) -> None:
        if self._native is not None:
            self._native.close()  # its statements first: a connection with statements left does not close
            self._native = None
        self.conn.close()

    def native_turn(self, event_delay: float = 0.0) -> Optional["NativeTurn"]:
        """The writer's turn for plain submits in C, on this connection
        (created once; None if this SQLite cannot load it).  It holds a
        one-by-one submit's event up to `event_delay` seconds."""
        if self._native is None:
            if faults.test_vfs():
                return None  # a VFS written in Python reports its errors to apsw, not to C
            try:
                self._native = NativeTurn(self.conn, event_delay)
            except (apsw.Error, errors.EngineError) as e:
                print(f"headrace writer: the C turn for plain submits is off ({type(e).__name__}: {e})",
                      file=sys.stderr)
                return None
        return self._native

    # ---- transactions ---------------------------------------------------------

    def transaction(self) -> "_Txn":
        return self._txn

    # ---- writes --------------------------------------------------------------

    def _insert(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if len(rows) == 1:  # the one-by-one submit: execute is cheaper than executemany
            self.conn.execute(sql, rows[0])
        elif rows:
            self.conn.executemany(sql, rows)

    def insert_tasks(self, rows: Sequence[TaskRow], bodies: Sequence[Tuple[int, bytes]]) -> None:
        self._insert(_INSERT_TASK, rows)
        self._insert(_INSERT_PAYLOAD, bodies)

    def existing(self, ids: Sequence[int]) -> List[int]:
        out = []
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            q = f"SELECT id FROM tasks WHERE id IN ({','.join('?' * len(part))})"
            out.extend(r[0] for r in self.conn.execute(q, part))
        return out

    def record_outcomes(self, rows: Sequence[OutcomeRow]) -> None:
        self.conn.executemany("INSERT INTO outcomes(id,attempt,state,at,info) VALUES(?,?,?,?,?)", rows)

    def put_results(self, rows: Sequence[ResultRow]) -> None:
        # An attempt's first word stands: a fenced attempt's late result never
        # replaces the timeout that ended it.
        self.conn.executemany("INSERT OR IGNORE INTO results(id,attempt,kind,body) VALUES(?,?,?,?)", rows)

    def define(self, rows: Sequence[Tuple[Any, ...]]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO definitions(name,max_attempts,timeout_ms,backoff,every_us,"
                              "cron,prio,next_at) VALUES(?,?,?,?,?,?,?,?)", rows)

    def definitions(self) -> Dict[str, Tuple[Any, ...]]:
        return {r[0]: tuple(r[1:]) for r in self.conn.execute(
            "SELECT name,max_attempts,timeout_ms,backoff,every_us,cron,prio,next_at FROM definitions")}

    def log_submits(self, rows: Sequence[Tuple[int, int, int, int]]) -> None:
        self._insert(_INSERT_EVENT, rows)

    def purge_events(self, before_us: int, limit: int) -> None:
        # Events are appended in time order: look at the oldest only (filtering
        # first would scan the whole log when none is old enough).
        self.conn.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?) AND at < ?",
                          (limit, before_us))

    def repair_events(self, next_seq: int, lost: bool) -> int:
        c = self.conn
        horizon = self.meta_get("events_seq")
        missing: List[Tuple[int, int, int, int]] = []
        if lost and horizon is not None:  # none: from before events were held, when each had its own commit
            tasks = list(c.execute("SELECT id, created FROM tasks WHERE seq >= ? ORDER BY seq", (horizon,)))
            if tasks:
                lo, hi = min(t[0] for t in tasks), max(t[0] for t in tasks)
                covered = set()
                # No index on events.id: one scan, at a start after a crash only.
                for first, n in c.execute("SELECT id, n FROM events WHERE id <= ? AND id + n > ?", (hi, lo)):
                    covered.update(range(max(first, lo), min(first + n, hi + 1)))
                missing = [(protocol.EV_SUBMITTED, tid, 1, created) for tid, created in tasks if tid not in covered]
                self.log_submits(missing)
        self.meta_set("events_seq", next_seq)
        return len(missing)

    def oldest_event_at(self) -> int:
        for (at,) in self.conn.execute("SELECT at FROM events ORDER BY seq LIMIT 1"):
            return int(at)
        return 1 << 62

    def oldest_outcome_at(self) -> Optional[int]:
        # Outcomes are appended with the writer's clock: the first is the oldest.
        for (at,) in self.conn.execute("SELECT at FROM outcomes ORDER BY rowid LIMIT 1"):
            return int(at)
        return None

    def finished_after(self, after_id: int, limit: int) -> List[Tuple[int, int, int]]:
        return list(self.conn.execute(
            f"SELECT t.id, COALESCE({_LAST_STATE}, 0),"
            " COALESCE((SELECT o.at FROM outcomes o WHERE o.id = t.id ORDER BY o.rowid DESC LIMIT 1), 0)"
            " FROM tasks t WHERE t.id > ? ORDER BY t.id LIMIT ?", (after_id, limit)))

    def purge(self, ids: Sequence[int]) -> None:
        c = self.conn
        for i in range(0, len(ids), 500):
            part = list(ids[i:i + 500])
            marks = ",".join("?" * len(part))
            for table, col in (("tasks", "id"), ("payloads", "id"), ("outcomes", "id"), ("results", "id"),
                               ("tags", "id"), ("deps", "parent"), ("deps", "child")):
                c.execute(f"DELETE FROM {table} WHERE {col} IN ({marks})", part)

    def set_next_runs(self, nexts: Dict[str, int]) -> None:
        self.conn.executemany("UPDATE definitions SET next_at = ? WHERE name = ?", [(t, n) for n, t in nexts.items()])

    def groups(self) -> Dict[str, Tuple[int, int]]:
        return {r[0]: (r[1], r[2]) for r in self.conn.execute("SELECT name, idx, lim FROM groups")}

    def add_tags(self, rows: Sequence[Tuple[int, str, str]]) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO tags(id, k, v) VALUES(?, ?, ?)", rows)

    def wait_for(self, child: int, parents: Sequence[int]) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO deps(parent, child) VALUES(?, ?)", [(p, child) for p in parents])
        self.conn.execute("INSERT OR REPLACE INTO waiting(child, remaining) VALUES(?, ?)", (child, len(parents)))

    def parents_done(self, parents: Sequence[int]) -> List[int]:
        c = self.conn
        counts: Dict[int, int] = {}
        for i in range(0, len(parents), 500):
            part = parents[i:i + 500]
            for (child,) in c.execute(
                    f"SELECT d.child FROM deps d JOIN waiting w ON w.child = d.child"
                    f" WHERE d.parent IN ({','.join('?' * len(part))})", part):
                counts[child] = counts.get(child, 0) + 1
        if not counts:
            return []
        c.executemany("UPDATE waiting SET remaining = remaining - ? WHERE child = ?",
                      [(n, ch) for ch, n in counts.items()])
        # An edge counts once: a flush repeated after a writer crash (between
        # its commit and the ring's advance) finds nothing left to count.
        for i in range(0, len(parents), 500):
            part = parents[i:i + 500]
            c.execute(f"DELETE FROM deps WHERE parent IN ({','.join('?' * len(part))})", part)
        ready = [ch for ch in counts
                 if c.execute("SELECT remaining FROM waiting WHERE child = ?", (ch,)).fetchall()[0][0] <= 0]
        c.executemany("DELETE FROM waiting WHERE child = ?", [(ch,) for ch in ready])
        return ready

    def stop_waiting(self, tid: int) -> bool:
        self.conn.execute("DELETE FROM waiting WHERE child = ?", (tid,))
        return self.conn.changes() > 0

    def waiting_children(self, parents: Sequence[int]) -> List[int]:
        out: List[int] = []
        for i in range(0, len(parents), 500):
            part = parents[i:i + 500]
            out.extend(r[0] for r in self.conn.execute(
                f"SELECT DISTINCT d.child FROM deps d JOIN waiting w ON w.child = d.child"
                f" WHERE d.parent IN ({','.join('?' * len(part))})", part))
        self.conn.executemany("DELETE FROM waiting WHERE child = ?", [(ch,) for ch in out])
        return out

    def put_group(self, name: str, idx: int, limit: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO groups(name, idx, lim) VALUES(?, ?, ?)", (name, idx, limit))

    def group_live(self, name: str) -> List[int]:
        return [r[0] for r in self.conn.execute(
            f"SELECT t.id FROM tasks t WHERE t.grp = ? AND COALESCE({_LAST_STATE}, 0) < ?", (name, TERMINAL_MIN))]

    def dead_ids(self, ids: Sequence[int]) -> List[Tuple[int, int, int]]:
        out = []
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            out.extend(self.conn.execute(
                f"SELECT t.id, {_LAST_ATTEMPT} FROM tasks t"
                f" WHERE t.id IN ({','.join('?' * len(part))}) AND {_LAST_STATE} = ?", (*part, DEAD)))
        return out

    def tasks_for(self, ids: Sequence[int]) -> List[LiveRow]:
        out: List[LiveRow] = []
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            out.extend(self.conn.execute(
                f"SELECT t.id, t.prio, t.seq, t.run_at, {_LIVE_TAIL} FROM tasks t"
                f" WHERE t.id IN ({','.join('?' * len(part))})", part))
        return out

    def spill_add(self, rows: Iterable[SpillRow]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO spill(nprio,seq,id,gate) VALUES(?,?,?,?)",
                              [(255 - p, s, i, g) for p, s, i, g in rows])

    def spill_take(self, n: int, gate: int = 0) -> List[LiveRow]:
        rows = list(self.conn.execute(
            f"SELECT s.id, 255 - s.nprio, s.seq, {_RUN_AT}, {_LIVE_TAIL}"
            " FROM spill s JOIN tasks t ON t.id = s.id WHERE s.gate = ? ORDER BY s.nprio, s.seq LIMIT ?",
            (gate, n)))
        if rows:
            # They are the first of the gate in key order: one range delete
            # (0.5-0.7 us a row, against 1.8-2.0 deleting row by row).
            last = rows[-1]
            self.conn.execute("DELETE FROM spill WHERE gate = ? AND (nprio, seq) <= (?, ?)",
                              (gate, 255 - last[1], last[2]))
        return rows

    def spill_best(self) -> Optional[Tuple[int, int]]:
        for nprio, seq in self.conn.execute(
                "SELECT nprio, seq FROM spill WHERE gate = 0 ORDER BY nprio, seq LIMIT 1"):
            return 255 - nprio, seq
        return None

    def spill_gates(self) -> Dict[int, int]:
        return dict(self.conn.execute("SELECT gate, count(*) FROM spill WHERE gate > 0 GROUP BY gate"))

    def spill_ranks(self, n: int) -> List[Tuple[int, int]]:
        return [(255 - p, s) for p, s in self.conn.execute(
            "SELECT nprio, seq FROM spill WHERE gate = 0 ORDER BY nprio, seq LIMIT ?", (n,))]

    def spill_find_dedup(self, dedup: bytes) -> Optional[int]:
        for (tid,) in self.conn.execute(
                "SELECT s.id FROM tasks t JOIN spill s ON s.id = t.id WHERE t.dedup = ? LIMIT 1", (dedup,)):
            return tid
        return None

    def spill_remove(self, tid: int) -> Optional[int]:
        for (gate,) in self.conn.execute("DELETE FROM spill WHERE id = ? RETURNING gate", (tid,)):
            return gate
        return None

    def spill_regate(self, group: str, gate: int) -> None:
        self.conn.execute("UPDATE spill SET gate = ? WHERE id IN (SELECT id FROM tasks WHERE grp = ?)",
                          (gate, group))

    def spill_reset(self, rows: Iterable[SpillRow]) -> None:
        self.conn.execute("DELETE FROM spill")
        self.spill_add(rows)

    def live(self) -> Iterator[LiveRow]:
        return self.conn.execute(
            f"SELECT t.id, t.prio, t.seq, {_RUN_AT}, {_LIVE_TAIL}"
            f" FROM tasks t WHERE COALESCE({_LAST_STATE}, 0) < ?"
            " AND NOT EXISTS (SELECT 1 FROM waiting w WHERE w.child = t.id)"
            " ORDER BY t.prio DESC, t.seq", (TERMINAL_MIN,))

    def max_id(self) -> int:
        return self.conn.execute("SELECT COALESCE(max(id), 0) FROM tasks").fetchall()[0][0]


    def meta_set(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(k, v) VALUES(?, ?)", (key, value))

    def bump(self, counts: Dict[str, int]) -> None:
        if not counts:
            return
        self.conn.executemany(
            "INSERT INTO counters(name, n) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET n = n + excluded.n",
            [(k, v) for k, v in counts.items() if v])

    def recount(self) -> None:
        c = self.conn
        # Purged tasks are gone from the tables but not from the totals.
        gone = {k: v for k, v in c.execute("SELECT name, n FROM counters WHERE name LIKE 'purged%'")}
        totals = {"submitted": c.execute("SELECT count(*) FROM tasks").fetchall()[0][0] + gone.get("purged", 0)}
        for state, name in ((COMPLETED, "completed"), (DEAD, "dead"), (CANCELLED, "cancelled")):
            totals[name] = c.execute("SELECT count(DISTINCT id) FROM outcomes WHERE state = ?",
                                     (state,)).fetchall()[0][0] + gone.get(f"purged_{name}", 0)
        c.executemany("INSERT OR REPLACE INTO counters(name, n) VALUES(?, ?)", list(totals.items()))

    # ---- checkpoints (the writer owns them) ----------------------------------------

    def checkpoint(self, truncate: bool = False) -> Tuple[int, int]:
        mode = apsw.SQLITE_CHECKPOINT_TRUNCATE if truncate else apsw.SQLITE_CHECKPOINT_PASSIVE
        return self.conn.wal_checkpoint(mode=mode)

    def wal_frames(self) -> int:
        """Frames in the WAL after the last commit on this connection, as the
        C turn's WAL hook counts them (0 without the C turn: checkpoints then
        run on the timer alone)."""
        return self._native.wal_frames() if self._native is not None else 0

    def wal_bytes(self) -> int:
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0


class NativeTurn:
    """csrc/turn.h's C turn on a store's connection: it loads the native
    core as a SQLite extension (so that C reaches the very SQLite library
    this connection runs on) and prepares the insert statements once."""

    def __init__(self, conn: apsw.Connection, event_delay: float = 0.0) -> None:
        # The C API only: the SQL function load_extension() stays off.
        conn.config(apsw.SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 1)
        try:
            conn.load_extension(_core.__file__, "sqlite3_headrace_init")
        finally:
            conn.config(apsw.SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0)
        out = ffi.new("hr_turn **")
        check(lib.hr_turn_open(conn.sqlite3pointer(), _INSERT_TASK.encode(), _INSERT_PAYLOAD.encode(),
                               _INSERT_EVENT.encode(), _EVENTS_HORIZON.encode(), int(event_delay * 1e6), out),
              "the C turn's statements")
        self._t = out[0]
        self.out = ffi.new("hr_turn_out *")

    def set_definitions(self, defs: Dict[str, Tuple[int, int, int]]) -> None:
        """name -> (max_attempts, timeout_ms, backoff), for jobs that left them unset."""
        names = [ffi.new("char[]", n.encode()) for n in defs]
        limits = ffi.new("int64_t[]", [v for d in defs.values() for v in d] or [0])
        check(lib.hr_turn_defs(self._t, len(names), ffi.new("char *[]", names) if names else ffi.NULL, limits),
              "the C turn's definitions")

    def loop(self, mem: Any, scan: int, replay_before: int, chunk: int, flush_in: float, wait: float,
             wal_limit: int) -> Any:
        """Turns from `scan`, waiting up to `wait` seconds for more, until
        one stops at something for Python (see csrc/turn.h; the dirty ring's
        flush is due in `flush_in` seconds); returns the ``hr_turn_out``
        (valid until the next call)."""
        check(lib.hr_turn_loop(mem, self._t, scan, replay_before, chunk, int(flush_in * 1e6), int(wait * 1e6),
                               wal_limit, self.out), "the C turn")
        return self.out

    def part(self, mem: Any, pos: int, start: int, end: int) -> Any:
        """Insert the parts in [start, end) of the data of the request being
        streamed at `pos` (`start` 0: its first); returns the ``hr_turn_out``
        (``stopped`` HR_TURN_OTHER: roll back)."""
        check(lib.hr_turn_part(mem, self._t, pos, start, end, self.out), "the C turn's part")
        return self.out

    def part_log(self) -> Any:
        """The streamed request's submit event, before the commit."""
        check(lib.hr_turn_part_log(self._t, self.out), "the C turn's submit event")
        return self.out

    def part_place(self, mem: Any, pos: int, now: int) -> Any:
        """Committed: show the streamed request's jobs in the segment, answer it."""
        check(lib.hr_turn_part_place(mem, self._t, pos, now, self.out), "the C turn's placing")
        return self.out

    def events(self, mem: Any, force: bool) -> Any:
        """Write the submit events it holds, if they are due (`force`: if
        there are any), in a transaction of their own; returns the
        ``hr_turn_out`` (``sql_rc`` set if the write failed)."""
        check(lib.hr_turn_events(mem, self._t, int(force), self.out), "the C turn's held events")
        return self.out

    def cache(self, mem: Any, tasks: Any, n: int) -> int:
        """Copy the jobs of tasks[0:n] (``hr_task[]``, about to be placed)
        from the database into the segment's job cache; returns how many."""
        return check(lib.hr_turn_cache(mem, self._t, _JOB_SQL, tasks, n), "the C turn's job cache")

    def wal_frames(self) -> int:
        """Frames in the WAL after the connection's last commit."""
        return int(lib.hr_turn_wal_frames(self._t))

    def close(self) -> None:
        if self._t is not None:
            lib.hr_turn_close(self._t)
            self._t = None


class _Txn:
    """BEGIN ... COMMIT, or ROLLBACK on an exception (cheaper than a savepoint)."""

    __slots__ = ("conn",)

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except apsw.Error:  # a full disk, say: leave no transaction open behind the error
                if not self.conn.get_autocommit():
                    self.conn.execute("ROLLBACK")
                raise
        if not self.conn.get_autocommit():
            self.conn.execute("ROLLBACK")


#: The columns a claim needs of each task (see Reader.jobs), to be completed by a WHERE clause.
_JOBS = ("SELECT t.id, t.name, t.ser, t.created, p.body, t.max_attempts, t.timeout_ms FROM tasks t"
         " JOIN payloads p ON p.id = t.id WHERE ")


#: The jobs of a run of ids, for the C turn's job cache (csrc/turn.h: hr_turn_cache).
_JOB_SQL = (_JOBS + "t.id BETWEEN ?1 AND ?2 ORDER BY t.id").encode()


class Reader(_Reads):
    """A read-only view of the database for producers, workers and the CLI."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = connect(path, [set_busy_timeout, set_query_only, set_no_mmap], readonly=True)

    def close(self) -> None:
        self.conn.close()

    def jobs(self, ids: Sequence[int]) -> Dict[int, Tuple[str, int, int, bytes, int, int]]:
        """id -> (name, ser, created, body, max_attempts as stored (0: unset), timeout_ms) for `ids`."""
        out: Dict[int, Tuple[str, int, int, bytes, int, int]] = {}
        if not ids:
            return out
        lo, hi = min(ids), max(ids)
        if hi - lo + 1 == len(ids) and len(set(ids)) == len(ids):
            # A claim's tasks are mostly a run of ids: one range scan is a
            # third cheaper than a seek per id (and reads no other task's payload).
            for r in self.conn.execute(_JOBS + "t.id BETWEEN ? AND ?", (lo, hi)):
                out[r[0]] = r[1:]
            return out
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            for r in self.conn.execute(_JOBS + f"t.id IN ({','.join('?' * len(part))})", part):
                out[r[0]] = r[1:]
        return out

    def attempt_bases(self, ids: Sequence[int]) -> Dict[int, int]:
        """id -> attempts used before the task was last put back from dead (0: never) for `ids`."""
        out: Dict[int, int] = {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            out.update(self.conn.execute(f"SELECT t.id, {_ATTEMPT_BASE} FROM tasks t"
                                         f" WHERE t.id IN ({','.join('?' * len(part))})", part))
        return out

    def task(self, tid: int) -> Optional[Dict[str, Any]]:
        """The stored record of task `tid` with its outcome history, or None."""
        rows = list(self.conn.execute(
            "SELECT id, name, prio, seq, created, run_at, dedup, grp, max_attempts, ser, timeout_ms, backoff"
            " FROM tasks WHERE id = ?",
            (tid,)))
        if not rows:
            return None
        r = rows[0]
        hist = list(self.conn.execute("SELECT attempt, state, at, info FROM outcomes WHERE id = ? ORDER BY rowid",
                                      (tid,)))
        results = list(self.conn.execute("SELECT attempt, kind, body FROM results WHERE id = ? ORDER BY attempt",
                                         (tid,)))
        spilled = bool(self.conn.execute("SELECT 1 FROM spill WHERE id = ?", (tid,)).fetchall())
        return {"id": r[0], "name": r[1], "priority": r[2], "seq": r[3], "created": r[4], "run_at": r[5],
                "dedup": r[6], "group": r[7], "max_attempts": r[8], "serializer": r[9],
                "history": hist, "spilled": spilled, "results": results,
                "timeout_ms": r[10], "backoff": r[11]}


    def ending(self, tid: int) -> Optional[Tuple[int, int, Optional[int], Optional[bytes], int]]:
        """How task `tid` stands on disk: (last state or 0, last attempt, result
        kind, result body, ser); the result is the last attempt's, if any.
        None if there is no such task."""
        rows = list(self.conn.execute(
            f"SELECT COALESCE({_LAST_STATE}, 0), {_LAST_ATTEMPT}, t.ser FROM tasks t WHERE t.id = ?", (tid,)))
        if not rows:
            return None
        state, attempt, ser = rows[0]
        res = list(self.conn.execute("SELECT kind, body FROM results WHERE id = ? AND attempt = ?",
                                     (tid, attempt)))
        kind, body = res[0] if res else (None, None)
        return state, attempt, kind, body, ser

    def result_of(self, tid: int, attempt: int) -> Optional[bytes]:
        """Attempt `attempt`'s stored return value, or None."""
        for (body,) in self.conn.execute("SELECT body FROM results WHERE id = ? AND attempt = ? AND kind = ?",
                                         (tid, attempt, RESULT)):
            return body
        return None

    def last_error(self, tid: int) -> Optional[bytes]:
        for (body,) in self.conn.execute(
                "SELECT body FROM results WHERE id = ? AND kind = ? ORDER BY attempt DESC LIMIT 1", (tid, ERROR)):
            return body
        return None

    def dead(self, limit: int) -> List[Tuple[int, str, int, Optional[bytes]]]:
        """(id, name, attempts, last error) of dead tasks, most recent first."""
        rows = self.conn.execute(
            "SELECT o.id FROM outcomes o WHERE o.state = ? GROUP BY o.id ORDER BY max(o.rowid) DESC", (DEAD,))
        out = []
        for (tid,) in rows:
            got = list(self.conn.execute(
                f"SELECT t.name, {_LAST_ATTEMPT} FROM tasks t WHERE t.id = ? AND {_LAST_STATE} = ?", (tid, DEAD)))
            if got:
                out.append((tid, got[0][0], got[0][1], self.last_error(tid)))
                if len(out) >= limit:
                    break
        return out

