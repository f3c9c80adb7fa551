"""persist-queue's SQLiteAckQueue, drained by 2 processes looping get/ack."""
from __future__ import annotations

from typing import Any, Callable, Dict

from .base import BUSY_TIMEOUT, Adapter, Recorder, StopFlag, read_pragmas


def ack_queue(path: str, auto_resume: bool = True) -> Any:
    """An SQLiteAckQueue in directory `path` whose connections run WAL + synchronous=NORMAL."""
    from persistqueue import SQLiteAckQueue

    class NormalSyncAckQueue(SQLiteAckQueue):
        # persist-queue sets journal_mode=WAL on each new connection and has
        # no synchronous option (SQLite's default is FULL): add NORMAL there.
        def _new_db_connection(self, path: str, multithreading: bool, timeout: float) -> Any:
            conn = super()._new_db_connection(path, multithreading, timeout)
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn

    return NormalSyncAckQueue(path, timeout=BUSY_TIMEOUT, auto_resume=auto_resume)


class PersistQueue(Adapter):
    name = "persist-queue"
    dist = "persist-queue"
    module = "persistqueue"
    durability = ("WAL: set by persist-queue on each connection; synchronous=NORMAL: an SQLiteAckQueue "
                  "subclass runs PRAGMA synchronous=NORMAL in _new_db_connection (no option for it)")
    batch_api = None
    worker_processes = 2
    semantics = ("ack-based, but get() is a SELECT then a separate UPDATE guarded only by a thread lock, "
                 "so two processes can take the same row")

    @property
    def worker_model(self) -> str:  # type: ignore[override]
        return (f"2 processes, each SQLiteAckQueue(path, auto_resume=False) looping get(block=False) + "
                f"ack(); sleep {self.poll * 1000:g} ms when empty (its blocking get() only wakes on "
                f"puts from its own process)")

    def open(self) -> None:
        self.q = ack_queue(self.path)

    def submit(self, p: Dict[str, Any]) -> None:
        self.q.put(p)  # one INSERT, committed

    def stored(self) -> int:
        # qsize() is a per-instance count that a fresh instance reads from the table.
        fresh = ack_queue(self.path, auto_resume=False)
        try:
            return int(fresh.qsize())
        finally:
            fresh.close()

    def effective(self) -> Dict[str, Any]:
        return read_pragmas(self.q._putter.execute)

    def close(self) -> None:
        self.q.close()

    def serve(self, rec: Recorder, ready: Callable[[], None], go: Callable[[], None]) -> None:
        from persistqueue.exceptions import Empty
        stop = StopFlag()
        # auto_resume=False: resuming turns every unacked row back to ready,
        # including rows the other worker holds right now.
        q = ack_queue(self.path, auto_resume=False)
        ready()
        go()
        while not stop.set:
            try:
                item = q.get(block=False)
            except Empty:
                stop.sleep(self.poll)
                continue
            rec.record(item)
            q.ack(item)
        q.close()
