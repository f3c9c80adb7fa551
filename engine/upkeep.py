"""The writer's timed duties: leases, delayed tasks, refills, answers nobody
will read, WAL checkpoints, and noticing that no client is left."""
from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

import apsw

from . import errors, shm, store
from .shm import now_us

if TYPE_CHECKING:  # pragma: no cover
    from .writer import Writer

#: Seconds between checks for a client-less database.
EXIT_CHECK_INTERVAL = 0.25
#: Most expired leases handled in one pass.
EXPIRE_BATCH = 4096


class Upkeep:
    """Runs each duty when its interval has passed."""

    def __init__(self, writer: "Writer") -> None:
        self.w = writer
        now = time.monotonic()
        self.next_pass = now
        self.next_checkpoint = now + writer.cfg.checkpoint_interval
        self.next_purge = now + writer.cfg.purge_interval
        self.next_exit_check = now + EXIT_CHECK_INTERVAL
        self.expire_buf = shm.Segment.tickets(EXPIRE_BATCH)
        self.expire_states = shm.ffi.new("uint8_t[]", EXPIRE_BATCH)
        self.checkpoints: Optional[_Checkpoints] = None  # started at the first checkpoint

    def maybe_run(self) -> None:
        now = time.monotonic()
        if now < self.next_pass:
            return
        self.next_pass = now + self.w.cfg.upkeep_interval
        self.run_once()
        if now >= self.next_purge:
            self.next_purge = now + self.w.cfg.purge_interval
            try:
                self.w.purge()
            except apsw.Error as e:
                print(f"headrace writer: purge failed ({e}); it will try again", file=sys.stderr)
        if now >= self.next_checkpoint:
            self.next_checkpoint = now + self.w.cfg.checkpoint_interval
            self.checkpoint()

    def run_once(self) -> None:
        seg = self.w.seg
        t = now_us()
        while True:
            out, n = seg.expire(t, EXPIRE_BATCH, self.expire_buf, self.expire_states)
            if n:
                self._record_expired(out, n)
            if n < EXPIRE_BATCH:
                break
        seg.promote(t)
        try:
            self.w.fire_schedules()
        except (apsw.Error, errors.EngineError) as e:
            print(f"headrace writer: periodic tasks not submitted this pass: {e}", file=sys.stderr)
        self.w.rebalance()
        self.reclaim()
        self.w.write_totals()

    def _record_expired(self, out: Any, n: int) -> None:
        """Store why each expired attempt ended, as its error."""
        rows = []
        for k in range(n):
            tk, st = out[k], self.expire_states[k]
            if st & shm.TIMED_OUT:
                err = errors.describe_error("TimeoutError", f"attempt {tk.attempt} ran past its timeout")
            else:
                err = errors.describe_error("LeaseExpired", f"the worker running attempt {tk.attempt} stopped "
                                            "renewing its lease and is presumed dead")
            rows.append((tk.id, tk.attempt, store.ERROR, err))
        try:
            with self.w.store.transaction():
                self.w.store.put_results(rows)
        except apsw.Error as e:
            print(f"headrace writer: could not store {n} expiry errors: {e}", file=sys.stderr)

    def reclaim(self) -> None:
        """Free request records whose producer read its answer or died waiting."""
        self.w.seg.req_sweep(self.w.scan)

    def checkpoint(self) -> None:
        """PASSIVE on a timer (on the checkpoint thread); TRUNCATE, here,
        once the WAL outgrows its bound."""
        store = self.w.store
        if store.wal_bytes() <= self.w.cfg.wal_truncate_bytes:
            if self.checkpoints is None:
                self.checkpoints = _Checkpoints(store)
                self.checkpoints.start()
            if self.checkpoints.is_alive():
                self.checkpoints.due.set()
                return
        try:
            store.checkpoint(truncate=store.wal_bytes() > self.w.cfg.wal_truncate_bytes)
        except apsw.BusyError:
            pass  # a reader holds an old snapshot (or a PASSIVE one runs); the next pass tries again
        except apsw.Error as e:
            print(f"headrace writer: checkpoint failed: {e}", file=sys.stderr)

    def stop(self) -> None:
        """End the checkpoint thread (before the writer's last checkpoint)."""
        if self.checkpoints is not None:
            self.checkpoints.stop()
            self.checkpoints = None

    def due_exit_check(self) -> bool:
        now = time.monotonic()
        if now < self.next_exit_check:
            return False
        self.next_exit_check = now + EXIT_CHECK_INTERVAL
        return True


class _Checkpoints(threading.Thread):
    """Runs a PASSIVE checkpoint each time `due` is set.  SQLite lets it
    copy the WAL into the database while the writer's thread commits (apsw
    lets go of the GIL meanwhile), so the writer's turns no longer stall
    for it; a checkpoint that fails is tried again at the next pass."""

    def __init__(self, st: "store.SQLiteStore") -> None:
        super().__init__(name="headrace-checkpoints", daemon=True)
        self.store = st
        self.due = threading.Event()
        self.quit = False

    def run(self) -> None:
        try:
            ck = self.store.checkpointer()
        except errors.StoreError as e:  # the writer's thread checkpoints instead (is_alive is False)
            print(f"headrace writer: no checkpoint thread ({e}); checkpoints run between turns", file=sys.stderr)
            return
        try:
            while True:
                self.due.wait()
                self.due.clear()
                if self.quit:
                    return
                try:
                    ck.passive()
                except apsw.BusyError:
                    pass
                except apsw.Error as e:
                    print(f"headrace writer: checkpoint failed: {e}", file=sys.stderr)
        finally:
            ck.close()

    def stop(self) -> None:
        self.quit = True
        self.due.set()
        self.join(30)
