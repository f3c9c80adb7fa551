"""Disk faults: a disk that fills up (or fails writes) under the writer, a
read-only database, and a database another process holds locked.

The full disk is an apsw VFS shim in the writer (HEADRACE_TEST_VFS, see
engine/faults.py) whose writes fail while a control file exists."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import apsw
import pytest

import engine
from engine import errors
from engine_helpers import wait_for
from helpers import CHILD_CWD, child_env


def _stored_args(q: engine.Queue) -> list:
    return sorted(str(engine.api.loads(ser, body)[0][0]) for ser, body in q.reader.conn.execute(
        "SELECT t.ser, p.body FROM tasks t JOIN payloads p ON p.id = t.id"))


@pytest.mark.parametrize("fault,error", [("full", errors.StoreFull), ("ioerr", errors.SubmitFailed)])
def test_a_failing_disk_refuses_submits_keeps_outcomes_and_recovers(db, tmp_path, monkeypatch, fault, error):
    """While writes fail: submits raise a typed error and store nothing,
    claimed tasks still finish (and more are claimed) in shared memory, and
    their outcomes and results wait in the writer.  When the disk is back,
    everything reaches the database and nothing accepted is lost."""
    ctl = str(tmp_path / "disk")
    monkeypatch.setenv("HEADRACE_TEST_VFS", ctl)
    with engine.Queue(db) as q:
        for i in range(30):
            q.submit("t", args=(i,))
        jobs = q.claim(10, timeout=5)
        assert len(jobs) == 10
        open(f"{ctl}.{fault}", "w").close()
        for i in range(3):
            with pytest.raises(error, match="nothing of it was stored") as e:
                q.submit("t", args=(f"lost{i}",))
        if fault == "full":
            assert isinstance(e.value, OSError) and "full" in str(e.value)
        with pytest.raises(error):
            q.submit_batch([engine.Job("t", args=(f"lostb{i}",)) for i in range(100)])
        for j in jobs[:5]:
            assert j.complete()
        for j in jobs[5:]:
            assert j.complete({"square": j.args[0] ** 2})  # a result: it goes through the writer
        more = q.claim(5, timeout=5)  # claims need no disk
        assert len(more) == 5
        for j in more:
            assert j.fail(RuntimeError("again"))
        time.sleep(0.5)  # the writer tries, and fails, several times
        os.remove(f"{ctl}.{fault}")
        wait_for(lambda: q.stats()["counts"]["completed"] == 10, what="the outcomes reached the database")
        for j in jobs[5:]:
            assert q.result(j.id, timeout=10) == {"square": j.args[0] ** 2}
        assert {q.get(j.id).attempts for j in more} == {1} and {q.get(j.id).state for j in more} == {"pending"}
        assert q.get(more[0].id).error["message"] == "again"
        after = q.submit("t", args=("after",))
        assert q.get(after).state == "pending"
        assert _stored_args(q) == sorted([str(i) for i in range(30)] + ["after"]), "nothing refused was stored"
        assert q.verify() == 21


def test_a_read_only_database_gives_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only files")
    db = str(tmp_path / "q.db")
    with engine.Queue(db) as q:
        q.submit("t", args=(1,))
    deadline = time.time() + 30
    while engine.paths.writer_alive(db) and time.time() < deadline:
        time.sleep(0.05)
    for f in os.listdir(tmp_path):
        os.chmod(tmp_path / f, 0o400)
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(errors.EngineError, match="read"):
            engine.Queue(db)
    finally:
        os.chmod(tmp_path, 0o700)


HOLD = r'''
import sys, time, apsw
c = apsw.Connection(sys.argv[1])
c.setbusytimeout(10000)  # the writer may be in one of its short transactions just now
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("ROLLBACK")
'''


def test_a_database_locked_by_another_process_delays_submits_until_it_lets_go(db):
    """Another process holds the write lock for 1.5 s: a submit waits for it
    (the busy timeout is 10 s) and is stored once the lock is released."""
    with engine.Queue(db) as q:
        q.submit("t", args=(0,))
        p = subprocess.Popen([sys.executable, "-c", HOLD, db, "1.5"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env(), cwd=CHILD_CWD)
        try:
            line = p.stdout.readline().strip()
            assert line == "locked", line or p.stderr.read()
            t = time.monotonic()
            tid = q.submit("t", args=(1,))
            waited = time.monotonic() - t
        finally:
            p.wait(30)
        assert 0.5 < waited < 10, waited
        assert q.get(tid).state == "pending"
        conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
        assert conn.execute("SELECT count(*) FROM tasks").fetchall()[0][0] == 2
        conn.close()
