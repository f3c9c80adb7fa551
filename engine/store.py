"""The durable record: what the writer does with the database, behind one interface.

SQLite is the truth; the shared-memory segment is a cache of the live set.
Everything the writer does to the database goes through :class:`Store`, so
that a PostgreSQL store for many machines can stand in later.

The schema keeps a task's life to appended rows:

- ``tasks`` (metadata) and ``payloads`` (blobs) are insert-only;
- ``outcomes`` is a log of (task, attempt, state, time); a task is live while
  it has no terminal outcome;
- ``spill`` holds the live tasks that do not fit in the segment, keyed by
  rank (priority descending, then FIFO sequence) - the only ordered index on
  the hot path;
- ``counters`` keeps running totals, so that stats need no table scan.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apsw

from . import errors

#: Schema version written into a new database; a newer one is refused.
SCHEMA_VERSION = 1
#: Milliseconds a connection waits on a busy database before it gives up.
BUSY_TIMEOUT_MS = 10_000

# Task states as stored (the same numbers as the segment's states).
PENDING, DELAYED, WAITING, RUNNING, COMPLETED, DEAD, CANCELLED = 1, 2, 3, 4, 5, 6, 7
TERMINAL_MIN = COMPLETED

#: One row of ``tasks``: (id, name, prio, seq, created, run_at, dedup, grp, max_attempts, ser)
TaskRow = Tuple[int, str, int, int, int, int, Optional[bytes], Optional[str], int, int]
#: (id, attempt, state, at_us, info)
OutcomeRow = Tuple[int, int, int, int, Optional[bytes]]
#: What the segment needs to hold a live task:
#: (id, prio, seq, run_at, dedup, attempt)
LiveRow = Tuple[int, int, int, int, Optional[bytes], int]

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
    ser INTEGER NOT NULL
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
    nprio INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY(nprio, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spill_id ON spill(id);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
"""


_INSERT_TASK = ("INSERT INTO tasks(id,name,prio,seq,created,run_at,dedup,grp,max_attempts,ser) "
                "VALUES(?,?,?,?,?,?,?,?,?,?)")
_INSERT_PAYLOAD = "INSERT INTO payloads(id,body) VALUES(?,?)"
#: A task's last attempt from the outcome log (0 if it never started); `t` is the task row.
_LAST_ATTEMPT = "COALESCE((SELECT max(attempt) FROM outcomes o WHERE o.id = t.id), 0)"


# ---- connection settings: each a named function applied on connect ---------

def set_busy_timeout(conn: apsw.Connection) -> None:
    """Wait for a busy database instead of failing at once."""
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)


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


def set_query_only(conn: apsw.Connection) -> None:
    """Readers can never write, even by mistake."""
    conn.pragma("query_only", True)


def connect(path: str, settings: Sequence[Any], *, readonly: bool = False) -> apsw.Connection:
    """Open `path` and apply each connection setting in order."""
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    try:
        conn = apsw.Connection(path, flags=flags)
        for fn in settings:
            fn(conn)
    except apsw.Error as e:
        raise errors.StoreError(f"cannot open database {path}: {e}") from e
    return conn


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

    def spill_add(self, rows: Iterable[Tuple[int, int, int]]) -> None:
        """Add (prio, seq, id) to the spill store."""
        raise NotImplementedError

    def spill_take(self, n: int) -> List[LiveRow]:
        """Remove and return the `n` best-ranked spilled tasks."""
        raise NotImplementedError

    def spill_best(self) -> Optional[Tuple[int, int]]:
        """(prio, seq) of the best spilled task, or None."""
        raise NotImplementedError

    def spill_count(self) -> int:
        raise NotImplementedError

    def spill_ranks(self, n: int) -> List[Tuple[int, int]]:
        """(prio, seq) of the `n` best spilled tasks, best first."""
        raise NotImplementedError

    def spill_find_dedup(self, dedup: bytes) -> Optional[int]:
        """The id of a spilled (live) task holding `dedup`, or None."""
        raise NotImplementedError

    def spill_remove(self, ids: Sequence[int]) -> None:
        raise NotImplementedError

    def spill_reset(self, rows: Iterable[Tuple[int, int, int]]) -> None:
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
        self.conn = connect(path, [set_busy_timeout, set_wal, set_synchronous(sync),
                                   disable_autocheckpoint, set_cache])
        self._prepare()
        self._txn = _Txn(self.conn)

    def _prepare(self) -> None:
        c = self.conn
        try:
            with c:
                c.execute(_SCHEMA)
                v = self.meta_get("schema_version")
                if v is None:
                    self.meta_set("schema_version", SCHEMA_VERSION)
                elif int(v) > SCHEMA_VERSION:
                    raise errors.SchemaMismatch(
                        f"database {self.path} has schema version {v}; this headrace reads up to "
                        f"{SCHEMA_VERSION}. Upgrade headrace.")
        except apsw.NotADBError as e:
            raise errors.StoreCorrupt(f"{self.path} is not a SQLite database: {e}") from e
        except apsw.CorruptError as e:
            raise errors.StoreCorrupt(f"database {self.path} is corrupt: {e}") from e

    def close(self) -> None:
        self.conn.close()

    # ---- transactions ---------------------------------------------------------

    def transaction(self) -> "_Txn":
        return self._txn

    # ---- writes --------------------------------------------------------------

    def insert_tasks(self, rows: Sequence[TaskRow], bodies: Sequence[Tuple[int, bytes]]) -> None:
        c = self.conn
        if len(rows) == 1:  # the one-by-one submit: execute is cheaper than executemany
            c.execute(_INSERT_TASK, rows[0])
            c.execute(_INSERT_PAYLOAD, bodies[0])
            return
        c.executemany(_INSERT_TASK, rows)
        c.executemany(_INSERT_PAYLOAD, bodies)

    def existing(self, ids: Sequence[int]) -> List[int]:
        out = []
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            q = f"SELECT id FROM tasks WHERE id IN ({','.join('?' * len(part))})"
            out.extend(r[0] for r in self.conn.execute(q, part))
        return out

    def record_outcomes(self, rows: Sequence[OutcomeRow]) -> None:
        self.conn.executemany("INSERT INTO outcomes(id,attempt,state,at,info) VALUES(?,?,?,?,?)", rows)

    def spill_add(self, rows: Iterable[Tuple[int, int, int]]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO spill(nprio,seq,id) VALUES(?,?,?)",
                              [(255 - p, s, i) for p, s, i in rows])

    def spill_take(self, n: int) -> List[LiveRow]:
        rows = list(self.conn.execute(
            "SELECT s.id, 255 - s.nprio, s.seq, t.run_at, t.dedup,"
            f" {_LAST_ATTEMPT}"
            " FROM spill s JOIN tasks t ON t.id = s.id ORDER BY s.nprio, s.seq LIMIT ?", (n,)))
        if rows:
            self.conn.executemany("DELETE FROM spill WHERE nprio = ? AND seq = ?",
                                  [(255 - r[1], r[2]) for r in rows])
        return rows

    def spill_best(self) -> Optional[Tuple[int, int]]:
        for nprio, seq in self.conn.execute("SELECT nprio, seq FROM spill ORDER BY nprio, seq LIMIT 1"):
            return 255 - nprio, seq
        return None

    def spill_ranks(self, n: int) -> List[Tuple[int, int]]:
        return [(255 - p, s) for p, s in self.conn.execute(
            "SELECT nprio, seq FROM spill ORDER BY nprio, seq LIMIT ?", (n,))]

    def spill_find_dedup(self, dedup: bytes) -> Optional[int]:
        for (tid,) in self.conn.execute(
                "SELECT s.id FROM tasks t JOIN spill s ON s.id = t.id WHERE t.dedup = ? LIMIT 1", (dedup,)):
            return tid
        return None

    def spill_remove(self, ids: Sequence[int]) -> None:
        self.conn.executemany("DELETE FROM spill WHERE id = ?", [(i,) for i in ids])

    def spill_reset(self, rows: Iterable[Tuple[int, int, int]]) -> None:
        self.conn.execute("DELETE FROM spill")
        self.spill_add(rows)

    def live(self) -> Iterator[LiveRow]:
        return self.conn.execute(
            "SELECT t.id, t.prio, t.seq, t.run_at, t.dedup,"
            f" {_LAST_ATTEMPT}"
            " FROM tasks t WHERE NOT EXISTS"
            " (SELECT 1 FROM outcomes o WHERE o.id = t.id AND o.state >= ?)"
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
        totals = {"submitted": c.execute("SELECT count(*) FROM tasks").fetchall()[0][0]}
        for state, name in ((COMPLETED, "completed"), (DEAD, "dead"), (CANCELLED, "cancelled")):
            totals[name] = c.execute("SELECT count(DISTINCT id) FROM outcomes WHERE state = ?",
                                     (state,)).fetchall()[0][0]
        c.executemany("INSERT OR REPLACE INTO counters(name, n) VALUES(?, ?)", list(totals.items()))

    # ---- checkpoints (the writer owns them) ----------------------------------------

    def checkpoint(self, truncate: bool = False) -> Tuple[int, int]:
        mode = apsw.SQLITE_CHECKPOINT_TRUNCATE if truncate else apsw.SQLITE_CHECKPOINT_PASSIVE
        return self.conn.wal_checkpoint(mode=mode)

    def wal_bytes(self) -> int:
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0


class _Txn:
    """BEGIN ... COMMIT, or ROLLBACK on an exception (cheaper than a savepoint)."""

    __slots__ = ("conn",)

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif not self.conn.get_autocommit():
            self.conn.execute("ROLLBACK")


class Reader(_Reads):
    """A read-only view of the database for producers, workers and the CLI."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = connect(path, [set_busy_timeout, set_query_only], readonly=True)

    def close(self) -> None:
        self.conn.close()

    def jobs(self, ids: Sequence[int]) -> Dict[int, Tuple[str, int, int, int, bytes]]:
        """id -> (name, ser, max_attempts, created, body) for `ids`."""
        out: Dict[int, Tuple[str, int, int, int, bytes]] = {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            q = ("SELECT t.id, t.name, t.ser, t.max_attempts, t.created, p.body FROM tasks t"
                 f" JOIN payloads p ON p.id = t.id WHERE t.id IN ({','.join('?' * len(part))})")
            for r in self.conn.execute(q, part):
                out[r[0]] = r[1:]
        return out

    def task(self, tid: int) -> Optional[Dict[str, Any]]:
        """The stored record of task `tid` with its outcome history, or None."""
        rows = list(self.conn.execute(
            "SELECT id, name, prio, seq, created, run_at, dedup, grp, max_attempts, ser FROM tasks WHERE id = ?",
            (tid,)))
        if not rows:
            return None
        r = rows[0]
        hist = list(self.conn.execute("SELECT attempt, state, at, info FROM outcomes WHERE id = ? ORDER BY rowid",
                                      (tid,)))
        spilled = bool(self.conn.execute("SELECT 1 FROM spill WHERE id = ?", (tid,)).fetchall())
        return {"id": r[0], "name": r[1], "priority": r[2], "seq": r[3], "created": r[4], "run_at": r[5],
                "dedup": r[6], "group": r[7], "max_attempts": r[8], "serializer": r[9],
                "history": hist, "spilled": spilled}

    def counters(self) -> Dict[str, int]:
        return {k: v for k, v in self.conn.execute("SELECT name, n FROM counters")}

