"""RQ on Redis: Queue.enqueue / enqueue_many, drained by 2 RQ workers (its
default Worker, which forks a work horse per job)."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional

from .base import Recorder
from .servers import RedisAdapter, redis_durability

#: Set in each worker process before it works; its work horses inherit it.
RECORDER: Optional[Recorder] = None


def noop(p: Dict[str, Any]) -> None:
    """The task: RQ stores it by import path (peers.rq_redis.noop)."""
    assert RECORDER is not None, "noop runs in a worker only"
    RECORDER.record(p)


class Rq(RedisAdapter):
    name = "rq"
    dist = "rq"
    modules = ("rq", "redis")
    global_sets = ("rq:queues", "rq:workers")
    batch_api = "Queue.enqueue_many(1,000 Queue.prepare_data()): one pipeline, one MULTI/EXEC"
    worker_model = ("2 processes, each rq.Worker([queue]).work() as `rq worker` runs it: a blocking BLMOVE "
                    "dequeue (no polling) and a forked work horse per job; logging_level=WARNING (INFO logs "
                    "2 lines per job); jobs enqueued with result_ttl=0 (a no-op's None is not kept)")
    worker_processes = 2
    semantics = ("a running job waits in its queue's started registry; a job whose worker died is moved to "
                 "the failed registry and run again only if it has a Retry: at-most-once by default")

    def _job_id(self, p: Dict[str, Any]) -> str:
        # In the figure's namespace, so that cleanup() finds its keys.
        return f"{self.ns}-{p['i']}"

    def open(self) -> None:
        from rq import Queue
        self.r = self.client()
        self.q = Queue(self.ns, connection=self.r)

    def submit(self, p: Dict[str, Any]) -> None:
        self.q.enqueue(noop, p, job_id=self._job_id(p), result_ttl=0)

    def submit_batch(self, ps: List[Dict[str, Any]]) -> None:
        prepare = self.q.prepare_data
        self.q.enqueue_many([prepare(noop, (p,), job_id=self._job_id(p), result_ttl=0) for p in ps])

    def stored(self) -> int:
        return int(self.q.count)

    def effective(self) -> Dict[str, Any]:
        return redis_durability(self.r)

    def close(self) -> None:
        self.r.close()

    def serve(self, rec: Recorder, ready: Callable[[], None], go: Callable[[], None]) -> None:
        global RECORDER
        from rq import Queue, Worker
        rec.open_for_forks()  # one file per worker, not one per work horse
        RECORDER = rec
        r = self.client()
        w = Worker([Queue(self.ns, connection=r)], connection=r, name=f"{self.ns}-{os.getpid()}")
        ready()
        go()
        w.work(logging_level="WARNING")  # returns after SIGTERM (warm shutdown: a running job finishes)

