"""headrace itself: engine.Queue, its writer process and run_workers()."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List

from .base import TASK_NAME, Adapter, Recorder

#: Seconds to wait for a database's writer to exit after its last client closed
#: (it lingers idle_exit = 1 s, then flushes).
WRITER_EXIT_WAIT = 30.0


class Headrace(Adapter):
    name = "headrace"
    dist = "headrace"
    durability = "WAL + synchronous=NORMAL: Queue(sync='normal'), the default; the writer sets both on its connection"
    batch_api = "Queue.submit_batch(1,000 Jobs): one call, one transaction"
    worker_model = "Queue.run_workers(processes=2): 2 forked, supervised worker processes"
    worker_processes = 1
    semantics = ("at-least-once: lease + attempt fencing; a completion is recorded in shared memory "
                 "and reaches SQLite within flush_interval (20 ms)")

    @classmethod
    def version(cls) -> str:
        import engine
        return engine.__version__

    def _db(self) -> str:
        return os.path.join(self.path, "q.db")

    def open(self) -> None:
        import engine
        self.engine = engine
        self.q = engine.Queue(self._db())

    def submit(self, p: Dict[str, Any]) -> None:
        self.q.submit(TASK_NAME, args=(p,))

    def submit_batch(self, ps: List[Dict[str, Any]]) -> None:
        Job = self.engine.Job
        self.q.submit_batch([Job(TASK_NAME, args=(p,)) for p in ps])

    def stored(self) -> int:
        return int(self.q.stats()["counts"]["pending"])

    def effective(self) -> Dict[str, Any]:
        # synchronous is per connection and the writer's connection lives in
        # the writer process; journal_mode is persistent, so read it back.
        import apsw
        conn = apsw.Connection(self._db(), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            jm = conn.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            conn.close()
        return {"journal_mode": str(jm).lower(),
                "synchronous": "NORMAL" if self.q.sync == "normal" else self.q.sync.upper()}

    def close(self) -> None:
        self.q.close()

    def serve(self, rec: Recorder, ready: Callable[[], None], go: Callable[[], None]) -> None:
        import engine
        q = engine.Queue(self._db())

        @q.task(name=TASK_NAME)
        def noop(p: Dict[str, Any]) -> None:
            rec.record(p)

        ready()
        go()
        q.run_workers(processes=2)  # returns after SIGTERM, once the workers drained
        q.close()

    def cleanup(self) -> None:
        # The writer is detached (its own session), so the harness's process
        # group kill cannot reach it: wait for it to exit by itself, so that
        # its last flush does not overlap the next figure.
        from engine import paths
        db = self._db()
        if not os.path.exists(db):
            return
        deadline = time.monotonic() + WRITER_EXIT_WAIT
        while paths.writer_alive(db):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the headrace writer of {db} did not exit within {WRITER_EXIT_WAIT:.0f} s")
            time.sleep(0.05)
