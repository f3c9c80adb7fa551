"""huey's RedisHuey, drained by huey's own consumer with process workers."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from .base import Recorder
from .huey_sqlite import consume, with_task
from .servers import RedisAdapter, redis_durability, redis_url


def make_huey(ns: str, rec: Optional[Recorder] = None) -> Any:
    """A RedisHuey named after the figure's namespace (its keys are
    huey.*.<ns>), with the benchmark's task registered."""
    from huey import RedisHuey

    # results=False: a no-op returns None, which huey would not store anyway.
    # blocking=True (its default): workers wait in BRPOP, read_timeout 1 s.
    return with_task(RedisHuey(ns, url=redis_url(), results=False, blocking=True), rec)


class HueyRedis(RedisAdapter):
    name = "huey-redis"
    dist = "huey"
    modules = ("huey", "redis")
    batch_api = None  # TaskWrapper.map() is a loop of enqueue() too
    worker_processes = 1
    semantics = "at-most-once: BRPOP removes the message before the task runs"

    @property
    def worker_model(self) -> str:  # type: ignore[override]
        return ("huey.consumer.Consumer(workers=2, worker_type='process') on RedisHuey(blocking=True): each "
                "worker waits in BRPOP (no polling while tasks come; after a 1 s BRPOP timeout it sleeps "
                f"{self.poll * 1000:g} ms, as the huey peer's polling does)")

    def open(self) -> None:
        self.h = make_huey(self.ns)

    def submit(self, p: Dict[str, Any]) -> None:
        self.h.bench_task(p)  # one LPUSH

    def stored(self) -> int:
        return int(self.h.pending_count())

    def effective(self) -> Dict[str, Any]:
        return redis_durability(self.h.storage.conn)

    def close(self) -> None:
        self.h.storage.pool.disconnect()

    def serve(self, rec: Recorder, ready: Callable[[], None], go: Callable[[], None]) -> None:
        consume(make_huey(self.ns, rec), self.poll, ready, go)
