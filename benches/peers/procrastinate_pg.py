"""procrastinate on PostgreSQL (psycopg 3), drained by 2 worker processes.

Each figure runs in a database of its own, created (with procrastinate's
schema) by the figure's first open() and dropped by cleanup(); the DSN's own
database is only used to create and drop it.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from .base import Recorder
from .servers import CONNECT_TIMEOUT, PG_DSN_ENV, ServerAdapter, pg_address, pg_dsn, where

TASK = "bench_noop"
QUEUE = "bench"
#: Set on each figure's database, so that every connection of the producers
#: and the workers runs it: a commit returns before its WAL is flushed (the
#: WAL writer flushes it within 3 x wal_writer_delay), so a crash can lose the
#: last commits but not corrupt, as with SQLite's WAL + synchronous=NORMAL.
#: "on" would fsync the WAL at every commit, like synchronous=FULL.
SYNCHRONOUS_COMMIT = "off"
#: Settings read back from a connection to the figure's database.
READ_BACK = ("synchronous_commit", "fsync", "wal_sync_method", "wal_writer_delay")


def connect(dsn: str, **kw: Any) -> Any:
    import psycopg
    return psycopg.connect(dsn, connect_timeout=int(CONNECT_TIMEOUT), **kw)


def figure_dsn(db: str) -> str:
    from psycopg.conninfo import make_conninfo
    return make_conninfo(pg_dsn(), dbname=db)


def make_app(dsn: str, rec: Optional[Recorder] = None) -> Tuple[Any, Any]:
    """A procrastinate App on `dsn` (PsycopgConnector, psycopg_pool's
    defaults) with the benchmark's task registered."""
    from procrastinate import App, PsycopgConnector
    app = App(connector=PsycopgConnector(conninfo=dsn))

    @app.task(name=TASK, queue=QUEUE)
    def noop(p: Dict[str, Any]) -> None:
        if rec is not None:
            rec.record(p)
    return app, noop


class Procrastinate(ServerAdapter):
    name = "procrastinate"
    dist = "procrastinate"
    modules = ("procrastinate", "psycopg")
    client_dist = "psycopg"
    server = "PostgreSQL"
    env = PG_DSN_ENV
    durability = (f"synchronous_commit={SYNCHRONOUS_COMMIT}, set on the figure's database (ALTER DATABASE ... "
                  "SET), the closest match to WAL + synchronous=NORMAL: a commit returns before its WAL is "
                  "flushed, which the WAL writer does within 3 x wal_writer_delay, so a crash can lose the last "
                  "commits but not corrupt; fsync as the server is configured")
    batch_api = "Task.batch_defer(*1,000 kwargs): one call of procrastinate_defer_jobs_v1, one transaction"
    worker_model = ("2 processes, each App.run_worker_async(queues=['bench']) with its defaults: concurrency=1 "
                    "(the sync task runs in a thread), LISTEN/NOTIFY wakes it (polling every 5 s as a "
                    "fallback), succeeded jobs kept (delete_jobs='never')")
    worker_processes = 2
    semantics = ("a worker takes a job by setting its row to 'doing' (FOR UPDATE SKIP LOCKED) and ends it with "
                 "a status update; a dead worker's jobs stay 'doing' until retried (retry_stalled_jobs): "
                 "at-most-once by default")

    @classmethod
    def location(cls) -> str:
        return pg_dsn()

    @classmethod
    def address(cls) -> Tuple[str, Optional[int]]:
        return pg_address(pg_dsn())

    @classmethod
    def server_info(cls) -> str:
        with connect(pg_dsn()) as c:
            version = c.execute("SHOW server_version").fetchone()[0]
            settings = {k: c.execute(f"SHOW {k}").fetchone()[0] for k in ("fsync", "wal_sync_method")}
            user, may = c.execute("SELECT current_user, rolcreatedb OR rolsuper FROM pg_roles "
                                  "WHERE rolname = current_user").fetchone()
        if not may:
            raise RuntimeError(f"role {user} may not create databases (each figure runs in a database of its own)")
        return (f"PostgreSQL {version} at {where(cls.address())} (" + ", ".join(f"{k}={v}" for k, v in settings.items())
                + f"; each figure's database: synchronous_commit={SYNCHRONOUS_COMMIT})")

    def _ensure_database(self) -> bool:
        """Create the figure's database if it is not there; True if created."""
        with connect(pg_dsn(), autocommit=True) as c:
            if c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.ns,)).fetchone():
                return False
            c.execute(f'CREATE DATABASE "{self.ns}"')
            c.execute(f'ALTER DATABASE "{self.ns}" SET synchronous_commit = {SYNCHRONOUS_COMMIT}')
        return True

    def open(self) -> None:
        # The figure's process opens first; producers and workers start once it has.
        created = self._ensure_database()
        self.app, self.task = make_app(figure_dsn(self.ns))
        self.app.open()
        if created:
            self.app.schema_manager.apply_schema()

    def submit(self, p: Dict[str, Any]) -> None:
        self.task.defer(p=p)  # one call of procrastinate_defer_jobs_v1, committed

    def submit_batch(self, ps: List[Dict[str, Any]]) -> None:
        self.task.batch_defer(*({"p": p} for p in ps))

    def _query(self, sql: str) -> Any:
        with self.app.connector.get_sync_connector().pool.connection() as c:
            return c.execute(sql).fetchone()[0]

    def stored(self) -> int:
        return int(self._query(f"SELECT count(*) FROM procrastinate_jobs WHERE queue_name = '{QUEUE}' "
                               "AND status = 'todo'"))

    def effective(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"server": f"PostgreSQL {self._query('SHOW server_version')}"}
        out.update({k: self._query(f"SHOW {k}") for k in READ_BACK})
        return out

    def close(self) -> None:
        self.app.close()

    def serve(self, rec: Recorder, ready: Callable[[], None], go: Callable[[], None]) -> None:
        app, _ = make_app(figure_dsn(self.ns), rec)

        async def run() -> None:
            async with app.open_async():  # the pool is open before the clock starts
                ready()
                await asyncio.get_running_loop().run_in_executor(None, go)
                # Returns after SIGTERM (its own handlers: running jobs finish).
                await app.run_worker_async(queues=[QUEUE], name=f"bench-{os.getpid()}")

        asyncio.run(run())

    def cleanup(self) -> None:
        with connect(pg_dsn(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.ns}" WITH (FORCE)')
