"""Dramatiq's RedisBroker, drained by dramatiq.Worker in 2 processes."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from .base import Recorder, StopFlag
from .servers import RedisAdapter, redis_durability, redis_url

ACTOR = "bench_noop"
QUEUE = "default"


def make_broker(ns: str, rec: Optional[Recorder] = None) -> Tuple[Any, Any]:
    """A RedisBroker whose keys all start with the figure's namespace, and the
    benchmark's actor declared on it; default middleware."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    broker = RedisBroker(url=redis_url(), namespace=ns)

    def noop(p: Dict[str, Any]) -> None:
        if rec is not None:
            rec.record(p)
    actor = dramatiq.actor(noop, actor_name=ACTOR, queue_name=QUEUE, broker=broker)
    return broker, actor


class Dramatiq(RedisAdapter):
    name = "dramatiq"
    dist = "dramatiq"
    modules = ("dramatiq", "redis")
    batch_api = None  # group().run() and pipelines enqueue one message at a time
    worker_processes = 2
    semantics = ("at-least-once: a fetched message waits in its worker's ack set until the task returned; "
                 "the messages of a worker whose heartbeat stopped are requeued")

    @property
    def worker_model(self) -> str:  # type: ignore[override]
        return (f"2 processes, each dramatiq.Worker(broker, worker_threads=8 (its default), worker_timeout="
                f"{self._timeout_ms()} ms) as the `dramatiq` command runs one per process: consumers fetch up "
                f"to 16 messages at once (Lua) and poll an empty queue backing off from 5 ms up to "
                f"worker_timeout (its default 1,000 ms; set to --poll as for the other polling peers); "
                f"default middleware (AgeLimit, TimeLimit, ShutdownNotifications, Callbacks, Pipelines, "
                f"Retries)")

    def _timeout_ms(self) -> int:
        return max(1, round(self.poll * 1000))

    def open(self) -> None:
        self.broker, self.actor = make_broker(self.ns)

    def submit(self, p: Dict[str, Any]) -> None:
        self.actor.send(p)  # one Lua script call (enqueue)

    def stored(self) -> int:
        return int(self.broker.do_qsize(QUEUE))

    def effective(self) -> Dict[str, Any]:
        return redis_durability(self.broker.client)

    def close(self) -> None:
        self.broker.close()
        self.broker.client.close()

    def serve(self, rec: Recorder, ready: Callable[[], None], go: Callable[[], None]) -> None:
        from dramatiq import Worker
        stop = StopFlag()  # dramatiq.Worker leaves signals to its caller (the CLI)
        broker, _ = make_broker(self.ns, rec)
        worker = Worker(broker, worker_timeout=self._timeout_ms())
        ready()
        go()
        worker.start()
        while not stop.set:
            stop.sleep(1.0)
        worker.stop()  # running tasks finish; prefetched, unacked messages are requeued
        broker.close()
