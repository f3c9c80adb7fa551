"""litequeue's LiteQueue, drained by 2 processes looping pop/done."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict

from .base import BUSY_TIMEOUT, Adapter, Recorder, StopFlag, dumps, read_pragmas


class LiteQueue(Adapter):
    name = "litequeue"
    dist = "litequeue"
    module = "litequeue"
    durability = "WAL + synchronous=NORMAL: LiteQueue() runs both PRAGMAs on its connection itself"
    # litequeue has no batch put (its transaction() context manager is a
    # building block, not a batch API), so batch_submit loops put().
    batch_api = None
    worker_processes = 2
    semantics = "pop() is one UPDATE ... RETURNING in BEGIN IMMEDIATE; done() marks the row (rows are kept)"

    @property
    def worker_model(self) -> str:  # type: ignore[override]
        return (f"2 processes, each LiteQueue(path) looping pop() + done(); sleep {self.poll * 1000:g} ms "
                f"when empty (no blocking pop)")

    def _open(self) -> Any:
        from litequeue import LiteQueue as LQ
        # Extra keyword arguments go to sqlite3.connect().
        return LQ(os.path.join(self.path, "lq.db"), timeout=BUSY_TIMEOUT)

    def open(self) -> None:
        self.q = self._open()

    def submit(self, p: Dict[str, Any]) -> None:
        self.q.put(dumps(p))  # one autocommitted INSERT

    def stored(self) -> int:
        return int(self.q.qsize())

    def effective(self) -> Dict[str, Any]:
        return read_pragmas(self.q.conn.execute)

    def close(self) -> None:
        self.q.close()

    def serve(self, rec: Recorder, ready: Callable[[], None], go: Callable[[], None]) -> None:
        stop = StopFlag()
        q = self._open()
        ready()
        go()
        while not stop.set:
            msg = q.pop()
            if msg is None:
                stop.sleep(self.poll)
                continue
            rec.record(json.loads(msg.data))
            q.done(msg.message_id)
        q.close()
