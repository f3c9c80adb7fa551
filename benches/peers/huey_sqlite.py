"""huey's SqliteHuey, drained by huey's own consumer with process workers."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

from .base import BUSY_TIMEOUT, Adapter, Recorder, read_pragmas

#: huey registers tasks by name; producer and consumer must agree on it.
HUEY_TASK = "bench_noop"


def make_huey(path: str, rec: Optional[Recorder] = None) -> Any:
    """A SqliteHuey on `path` whose connections run WAL + synchronous=NORMAL,
    with the benchmark's task registered."""
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class NormalSyncStorage(SqliteStorage):
        # SqliteStorage takes journal_mode='wal' (its default) but its fsync
        # option only offers FULL (True) or OFF (False); None leaves SQLite's
        # default, FULL.  Set NORMAL on every connection it opens.
        def _create_connection(self) -> Any:
            conn = super()._create_connection()
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn

    # results=False: a no-op returns None, which huey would not store anyway.
    return with_task(SqliteHuey("bench", filename=path, results=False, storage_class=NormalSyncStorage,
                                journal_mode="wal", timeout=BUSY_TIMEOUT), rec)


def with_task(h: Any, rec: Optional[Recorder]) -> Any:
    """Huey `h` with the benchmark's task registered (as ``h.bench_task``)."""
    @h.task(name=HUEY_TASK)
    def noop(p: Dict[str, Any]) -> None:
        if rec is not None:
            rec.record(p)
    h.bench_task = noop
    return h


def consume(h: Any, poll: float, ready: Callable[[], None], go: Callable[[], None]) -> None:
    """Run huey's consumer on `h` with 2 process workers, polling every `poll` s, until SIGTERM."""
    from huey.consumer import Consumer
    consumer = Consumer(h, workers=2, worker_type="process", periodic=False,
                        initial_delay=poll, backoff=1.0, max_delay=poll, graceful_signal="TERM")
    ready()
    go()
    consumer.run()  # returns after SIGTERM (graceful: running tasks finish)


class Huey(Adapter):
    name = "huey"
    dist = "huey"
    module = "huey"
    durability = ("WAL: SqliteHuey(journal_mode='wal'), its default; synchronous=NORMAL: a SqliteStorage "
                  "subclass runs PRAGMA synchronous=NORMAL on each connection it opens (fsync= offers "
                  "only FULL or OFF)")
    batch_api = None  # TaskWrapper.map() is a loop of enqueue() too
    worker_processes = 1
    semantics = "at-most-once: dequeue deletes the row before the task runs"

    @property
    def worker_model(self) -> str:  # type: ignore[override]
        return (f"huey.consumer.Consumer(workers=2, worker_type='process'), polling an empty queue every "
                f"{self.poll * 1000:g} ms (initial_delay=max_delay, backoff=1; huey's defaults are "
                f"0.1 s backing off to 10 s)")

    def _db(self) -> str:
        return os.path.join(self.path, "huey.db")

    def open(self) -> None:
        self.h = make_huey(self._db())

    def submit(self, p: Dict[str, Any]) -> None:
        self.h.bench_task(p)  # enqueues; returns once committed

    def stored(self) -> int:
        return int(self.h.pending_count())

    def effective(self) -> Dict[str, Any]:
        return read_pragmas(self.h.storage.conn.execute)

    def close(self) -> None:
        self.h.storage.close()

    def serve(self, rec: Recorder, ready: Callable[[], None], go: Callable[[], None]) -> None:
        consume(make_huey(self._db(), rec), self.poll, ready, go)
