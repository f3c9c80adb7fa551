#!/usr/bin/env python3
"""What SQLite's page size costs a commit of one task (raw apsw, no engine).

    python benches/page_size.py [--rows 20000] [--runs 2]

Two tables shaped like the store's (a task row, a payload row of 110
bytes), WAL with synchronous=NORMAL and autocheckpoint off, a PASSIVE
checkpoint every 4,000 rows as the writer runs them by size.  For each page
size it prints the microseconds per one-row commit and per row in commits
of 1,000, and the WAL's size at the end: one-by-one submits write whole
pages, so their cost follows the page size (engine/store.py PAGE_SIZE).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Tuple

import apsw

SIZES = (4096, 2048, 1024)


def run(page_size: int, per_commit: int, rows: int) -> Tuple[float, int]:
    """(microseconds per row, WAL bytes at the end)."""
    d = tempfile.mkdtemp()
    c = apsw.Connection(os.path.join(d, "f.db"))
    c.pragma("page_size", page_size)
    c.pragma("journal_mode", "wal")
    c.pragma("synchronous", "normal")
    c.wal_autocheckpoint(0)
    c.execute("CREATE TABLE tasks(id INTEGER PRIMARY KEY, name TEXT, prio INT, seq INT, created INT, run_at INT,"
              " dedup BLOB, grp TEXT, ma INT, ser INT, t INT, b INT)")
    c.execute("CREATE TABLE payloads(id INTEGER PRIMARY KEY, body BLOB)")
    body = b"x" * 110
    t0 = time.perf_counter()
    i = 0
    while i < rows:
        with c:
            for _ in range(per_commit):
                c.execute("INSERT INTO tasks VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                          (i, "bench.noop", 0, i, 1, 0, None, None, 3, 0, 0, 0))
                c.execute("INSERT INTO payloads VALUES(?,?)", (i, body))
                i += 1
        if i % 4000 < per_commit:
            c.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    seconds = time.perf_counter() - t0
    wal = os.path.getsize(os.path.join(d, "f.db-wal"))
    c.close()
    return seconds / rows * 1e6, wal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    for _ in range(a.runs):
        for size in SIZES:
            one, wal = run(size, 1, a.rows)
            many, _ = run(size, 1000, a.rows * 5)
            print(f"page {size}: {one:.1f} us a one-row commit (WAL {wal / 1e6:.1f} MB), "
                  f"{many:.2f} us a row in commits of 1,000")


if __name__ == "__main__":
    main()
