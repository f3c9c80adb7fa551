"""Hostile database files: engine.Queue(path) and `headrace stats PATH` get a
clear typed error at once, never a crash, a traceback or a wait for a
writer that cannot start.  (Hostile segments: test_segment_files.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import apsw
import pytest

import engine
from engine import errors, paths, shm
from engine.store import SCHEMA_VERSION, SQLiteStore
from engine_helpers import wait_for
from helpers import CHILD_CWD, child_env

#: Seconds an open of a hostile file may take: far below the writer start timeout (120 s).
QUICK = 15.0


def _refused(path: str, cls: type, match: str) -> errors.EngineError:
    """Queue(path) raises `cls` quickly, and leaves no writer or segment behind."""
    segments = set(os.listdir(shm.SHM_DIR))
    t = time.monotonic()
    with pytest.raises(cls, match=match) as ei:
        engine.Queue(path)
    assert time.monotonic() - t < QUICK, f"the refusal took {time.monotonic() - t:.1f} s"
    if os.path.isfile(path):
        assert not paths.writer_alive(path)
        mine = shm.PREFIX + paths.segment_name(path)
        assert [f for f in set(os.listdir(shm.SHM_DIR)) - segments if f.startswith(mine)] == []
    return ei.value


def _cli_stats(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "stats", path], capture_output=True, text=True,
                          env=child_env(), cwd=CHILD_CWD, timeout=60)


def _cli_refuses(path: str, match: str) -> None:
    r = _cli_stats(path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert match in r.stderr, r.stderr
    assert r.stdout == ""


def _queue_with_tasks(db: str, n: int) -> None:
    """A real database holding `n` pending tasks, its writer gone and the WAL checkpointed into it."""
    with engine.Queue(db) as q:
        q.submit_batch([engine.Job("t", args=[i, "x" * 200]) for i in range(n)])
    wait_for(lambda: not paths.writer_alive(db), timeout=30, what="the writer exited")


def _root_page(db: str, table: str) -> int:
    c = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return c.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchall()[0][0]
    finally:
        c.close()


def _clobber(db: str, offset: int, n: int) -> None:
    with open(db, "r+b") as f:
        f.seek(offset)
        f.write(bytes((i * 37 + 11) & 0xFF for i in range(n)))


def test_garbage_bytes_are_refused_as_corrupt(db):
    with open(db, "wb") as f:
        f.write(os.urandom(16384))
    e = _refused(db, errors.StoreCorrupt, "not a SQLite database")
    assert "backup" in str(e)  # it says what to do
    _cli_refuses(db, "not a SQLite database")


def test_a_valid_header_with_a_damaged_schema_page_is_refused(db):
    _queue_with_tasks(db, 10)
    _clobber(db, 100, 3000)  # page 1 after the 100-byte header: the schema
    _refused(db, errors.StoreCorrupt, "corrupt")
    _cli_refuses(db, "corrupt")


def test_damaged_table_pages_met_by_the_writer_fail_the_opener_at_once(db):
    """The database opens (header, schema and meta are fine) but the pages of
    the tasks table are damaged: the writer meets them while it loads the live
    set, after it detached.  The opener used to respawn writers for 120 s and
    then report only that no writer came up; now the writer reports its
    start-up failure and the opener raises it."""
    _queue_with_tasks(db, 3000)
    page = apsw.Connection(db).pragma("page_size")
    root = _root_page(db, "tasks")
    _clobber(db, (root - 1) * page, page)
    SQLiteStore(db).close()  # the check before the writer detaches passes: this is the writer's own failure
    e = _refused(db, errors.StoreCorrupt, "corrupt")
    assert "failed to start" in str(e) and "backup" in str(e)
    _cli_refuses(db, "corrupt")


def test_a_database_from_a_future_schema_is_refused_untouched(db):
    s = SQLiteStore(db)
    with s.transaction():
        s.meta_set("schema_version", SCHEMA_VERSION + 1)
    s.close()
    before = open(db, "rb").read()
    e = _refused(db, errors.SchemaMismatch, f"schema version {SCHEMA_VERSION + 1}")
    assert "Upgrade headrace" in str(e)
    assert open(db, "rb").read() == before
    _cli_refuses(db, "Upgrade headrace")


@pytest.mark.parametrize("version", ["three", 0, -1, 2.5, b"\x03"])
def test_a_nonsense_schema_version_is_refused_as_corrupt(db, version):
    s = SQLiteStore(db)
    with s.transaction():
        s.meta_set("schema_version", version)
    s.close()
    _refused(db, errors.StoreCorrupt, "invalid schema version")


def test_a_sqlite_database_of_another_program_is_refused_untouched(db):
    c = apsw.Connection(db)
    c.execute("CREATE TABLE tasks(what TEXT); INSERT INTO tasks VALUES('mine')")
    c.close()
    before = open(db, "rb").read()
    _refused(db, errors.StoreCorrupt, "not a headrace one")
    assert open(db, "rb").read() == before  # no headrace tables, not even WAL mode
    assert not os.path.exists(db + "-wal")
    _cli_refuses(db, "not a headrace one")


def test_an_empty_file_is_a_new_database(db):
    """Queue() itself creates the file empty before the writer writes the
    schema, so an empty file is a new database (were it refused, a crash at
    that moment would leave a database that never opens)."""
    open(db, "wb").close()
    with engine.Queue(db) as q:
        tid = q.submit("t", args=[1])
        [job] = q.claim(max=1, timeout=5)
        assert job.id == tid
    r = _cli_stats(db)
    assert r.returncode == 0 and "pending" in r.stdout, r.stderr


def test_a_directory_in_place_of_the_database(db):
    os.mkdir(db)
    _refused(db, errors.StoreError, "Is a directory")
    _cli_refuses(db, "not a database file")


@pytest.mark.parametrize("side", [".lock", ".clients", ".writer.log"])
def test_side_files_that_are_not_regular_files_are_refused(db, side, tmp_path):
    """A directory, a FIFO or a symlink where a side file belongs: a typed
    error (a FIFO used to be opened, and SQLite or a lock could wait on it)."""
    victim = tmp_path / "victim"
    victim.write_text("do not touch")
    for make, match in ((os.mkdir, "cannot open|not a regular file"), (os.mkfifo, "cannot open|not a regular file"),
                        (lambda p: os.symlink(victim, p), "symlink")):
        make(db + side)
        t = time.monotonic()
        with pytest.raises(errors.StoreError, match=match):
            with engine.Queue(db):
                pass
        assert time.monotonic() - t < QUICK
        if os.path.isdir(db + side) and not os.path.islink(db + side):
            os.rmdir(db + side)
        else:
            os.unlink(db + side)
    assert victim.read_text() == "do not touch"
    with engine.Queue(db) as q:  # with the obstacle gone, the path works
        q.submit("t")


def test_a_fifo_in_place_of_the_database_does_not_hang(db):
    os.mkfifo(db)
    _refused(db, errors.UnsafeFile, "not a regular file")
    _cli_refuses(db, "not a database file")


def test_a_wal_that_is_a_directory_is_refused_at_once(db):
    _queue_with_tasks(db, 5)
    os.mkdir(db + "-wal")
    _refused(db, errors.StoreError, "-wal: Is a directory")
    _cli_refuses(db, "-wal: Is a directory")


def test_a_corrupt_database_under_a_running_writer_gives_typed_errors(db):
    """The file is overwritten with garbage while a writer runs: a new opener
    reads it itself (the writer is alive) and used to get a bare
    apsw.NotADBError; now StoreCorrupt."""
    with engine.Queue(db) as q:
        q.submit("t")
        with open(db, "r+b") as f:
            f.write(os.urandom(4096))
        t = time.monotonic()
        with pytest.raises(errors.StoreCorrupt, match="not a SQLite database"):
            engine.Queue(db)
        assert time.monotonic() - t < QUICK
