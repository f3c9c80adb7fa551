"""The writer's timed duties: leases, delayed tasks, refills, answers nobody
will read, WAL checkpoints, and noticing that no client is left."""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Optional, Tuple

import apsw

from . import errors, shm, store
from .shm import now_us

if TYPE_CHECKING:  # pragma: no cover
    from .writer import Writer

#: Seconds between checks for a client-less database.
EXIT_CHECK_INTERVAL = 0.25
#: Most expired leases handled in one pass.
EXPIRE_BATCH = 4096
#: Least time between two checkpoints the WAL's size calls for, in seconds.
SIZE_CHECKPOINT_SPACING = 0.01
#: Seconds between the WAL syncer's looks at the WAL file (see WalSync).
WAL_SYNC_INTERVAL = 0.01


class Upkeep:
    """Runs each duty when its interval has passed."""

    def __init__(self, writer: "Writer") -> None:
        self.w = writer
        now = time.monotonic()
        self.next_pass = now
        self.next_checkpoint = now + writer.cfg.checkpoint_interval
        self.next_size_checkpoint = now
        self.next_purge = now + writer.cfg.purge_interval
        self.next_exit_check = now + EXIT_CHECK_INTERVAL
        self.expire_buf = shm.Segment.tickets(EXPIRE_BATCH)
        self.expire_states = shm.ffi.new("uint8_t[]", EXPIRE_BATCH)

    def maybe_run(self) -> None:
        now = time.monotonic()
        if now >= self.next_pass:
            self.next_pass = now + self.w.cfg.upkeep_interval
            self.run_once()
            if now >= self.next_purge:
                self.next_purge = now + self.w.cfg.purge_interval
                try:
                    self.w.purge()
                except apsw.Error as e:
                    print(f"headrace writer: purge failed ({e}); it will try again", file=sys.stderr)
        # By size soon, not at the next pass (fast submits outgrow the bound
        # between passes), yet not after every commit while a reader holds
        # the WAL and no checkpoint can start it over.
        if now >= self.next_checkpoint or (now >= self.next_size_checkpoint and
                                           self.w.store.wal_frames() >= self.w.cfg.checkpoint_pages):
            self.next_checkpoint = now + self.w.cfg.checkpoint_interval
            self.next_size_checkpoint = now + SIZE_CHECKPOINT_SPACING
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
        self.w.write_held_events(force=False)

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
        """PASSIVE on a timer and once the WAL holds `checkpoint_pages` (as
        the C turn's WAL hook counts them); TRUNCATE once the WAL file
        outgrows its bound.

        Between turns, on purpose: a PASSIVE checkpoint on a thread of its
        own ran while turns committed, so it never caught up with the WAL's
        end, SQLite never restarted the WAL, and it grew to the TRUNCATE
        bound (365-398 MB in 20 s of one-by-one submits, against 160-195 MB
        this way: ``benches/probe.py single`` reports it)."""
        store = self.w.store
        try:
            if store.wal_bytes() > self.w.cfg.wal_truncate_bytes:
                store.checkpoint(truncate=True)
            else:
                store.checkpoint()
        except apsw.BusyError:
            pass  # a reader holds an old snapshot; the next pass tries again
        except apsw.Error as e:
            print(f"headrace writer: checkpoint failed: {e}", file=sys.stderr)

    def due_exit_check(self) -> bool:
        now = time.monotonic()
        if now < self.next_exit_check:
            return False
        self.next_exit_check = now + EXIT_CHECK_INTERVAL
        return True



class WalSync:
    """Flushes the WAL file to disk from a thread of its own, every
    WAL_SYNC_INTERVAL while commits write to it.

    With synchronous=NORMAL, SQLite syncs the WAL only when it checkpoints,
    and that sync wrote everything appended since the one before: at
    checkpoint_pages=8192 of 4 KiB, 33 MB of frames, 20-33 ms in which the writer
    committed nothing (a fifth of its time under one-by-one submits).  Synced
    as it grows, the WAL leaves the checkpoint 3-4 ms of work.  A sync
    earlier than SQLite's own changes nothing SQLite relies on."""

    def __init__(self, wal_path: str) -> None:
        self.path = wal_path
        #: fdatasync calls made (for tests).
        self.syncs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="headrace-wal-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = -1
        seen: Optional[Tuple[int, int]] = None
        try:
            while not self._stop.wait(WAL_SYNC_INTERVAL):
                if fd < 0:
                    try:
                        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        continue  # SQLite makes it at the first write
                st = os.fstat(fd)
                mark = (st.st_mtime_ns, st.st_size)
                if mark != seen:  # written since the last look
                    seen = mark
                    os.fdatasync(fd)
                    self.syncs += 1
        except OSError as e:
            # The checkpoints sync the WAL anyway, and meet the disk's error themselves.
            print(f"headrace writer: syncing the WAL between checkpoints stopped ({e})", file=sys.stderr)
        finally:
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
