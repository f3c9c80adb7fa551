"""The SQLite floor: raw apsw inserts of the same payload into one table.

No queue at all, so it only runs the submit workloads: it shows how far
each system's submit path is from what SQLite itself allows.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from .base import BUSY_TIMEOUT, Adapter, dumps, read_pragmas


class ApswFloor(Adapter):
    name = "apsw-floor"
    dist = "apsw"
    durability = "WAL + synchronous=NORMAL: PRAGMAs run right after apsw.Connection() opens"
    batch_api = "executemany() of 1,000 rows in one transaction"
    worker_model = None
    worker_processes = 0
    semantics = "none (a table of rows)"

    def open(self) -> None:
        import apsw
        self.conn = apsw.Connection(os.path.join(self.path, "floor.db"))
        self.conn.set_busy_timeout(int(BUSY_TIMEOUT * 1000))
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS q(id INTEGER PRIMARY KEY, body BLOB NOT NULL)")

    def submit(self, p: Dict[str, Any]) -> None:
        # Autocommit: one transaction per row, as a durable-on-return submit needs.
        self.conn.execute("INSERT INTO q(body) VALUES (?)", (dumps(p).encode(),))

    def submit_batch(self, ps: List[Dict[str, Any]]) -> None:
        with self.conn:
            self.conn.executemany("INSERT INTO q(body) VALUES (?)", [(dumps(p).encode(),) for p in ps])

    def stored(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM q").fetchone()[0])

    def effective(self) -> Dict[str, Any]:
        return read_pragmas(self.conn.execute)

    def close(self) -> None:
        self.conn.close()
