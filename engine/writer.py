"""The writer: the one process that writes the database.

It holds ``PATH.lock`` for its whole life.  Each turn of its loop it takes
whatever producers have published in the request area and whatever workers
have reported in the dirty ring, writes both in one transaction, commits,
and only then places the new tasks in the segment, answers the producers
(group commit: one commit covers every waiter it includes) and advances the
ring.  Between turns it runs upkeep (:mod:`engine.upkeep`).

Run it as ``python -m engine.writer PATH`` (``Queue`` starts it for you).
"""
from __future__ import annotations

import argparse
import collections
import fcntl
import json
import operator
import os
import signal
import struct
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

import apsw

from . import config, cron, errors, faults, paths, protocol, shm
from .shm import Segment, now_us
from .store import LiveRow, NativeTurn, SQLiteStore, SpillRow, TaskRow, store_error
from .upkeep import Upkeep, WalSync

#: Ids handed out by a rebuilt segment start this far above any seen before,
#: so that a producer replaying a request from the old segment never meets
#: an id that someone else was given since.
ID_GAP = 1 << 32
#: Most spilled tasks one rebalance moves into the segment.
SWAP_MAX = 4096
#: Limited groups together may hold about 1/GROUP_SHARE of the segment
#: beyond their limits; the rest of their backlog waits on disk, so that
#: parked tasks never crowd out the tasks of other groups.
GROUP_SHARE = 4
#: Seconds a streamed request may go without a new part before the writer
#: rolls back what it did with it and waits for the whole request instead
#: (a producer that stopped, or a slow generator of jobs).
STREAM_STALL = 0.1
#: Longest the C turn loop waits for submits before it hands back to the
#: run loop (which checks for a stop signal), in seconds.
NATIVE_WAIT = 0.05
#: Exit codes.
EXIT_OK = 0
EXIT_LOCKED = 0  # another writer runs: not an error
EXIT_FAILED = 2

# hr_dirty as bytes: the slot number, then the slot record's id, run_at, attempt, max_attempts and state.
_DIRTY = struct.Struct("<8xQ8xq40xII24xB7x")
assert _DIRTY.size == shm.ffi.sizeof("hr_dirty") and shm.ffi.offsetof("hr_dirty", "rec") == 8

# Item fields, fetched in C.
_DEDUP, _GROUP, _DEPS, _TAGS = (operator.itemgetter(5), operator.itemgetter(8), operator.itemgetter(12),
                                operator.itemgetter(13))

_TERMINAL_NAMES = {shm.COMPLETED: "completed", shm.DEAD: "dead", shm.CANCELLED: "cancelled"}


#: Request modes of plain submits (ON_DUPLICATE's, without REPLAY, REPORT or MANAGE).
_PLAIN_MODES = frozenset(protocol.ON_DUPLICATE.values())


def _submit_events(requests: Sequence[Tuple[List[int], int]]) -> List[Tuple[int, int, int, int]]:
    """The event log's rows of submit requests, each (ids inserted, time):
    one per run of consecutive ids (a batch's need not be one run: the jobs
    it did not insert, or another producer's ids between its parts)."""
    rows = []
    for ids, at in requests:
        kind = protocol.EV_SUBMITTED if len(ids) == 1 else protocol.EV_BATCH_SUBMITTED
        start = 0
        for k in range(1, len(ids) + 1):
            if k == len(ids) or ids[k] != ids[k - 1] + 1:
                rows.append((kind, ids[start], k - start, at))
                start = k
    return rows


def _live(rows: Sequence[TaskRow]) -> List[LiveRow]:
    """The live rows (store.LiveRow) of new task rows: not started yet."""
    return [(r[0], r[2], r[3], r[5], r[6], 0, r[8], r[10], r[11], r[7]) for r in rows]


def _rank(prio: int, seq: int) -> Tuple[int, int]:
    """Sort key: smaller runs first."""
    return 255 - prio, seq


def _live_rank(r: LiveRow) -> Tuple[int, int]:
    return 255 - r[1], r[2]


class Writer:
    """One writer for one database; :meth:`run` until no client is left."""

    def __init__(self, db: str, cfg: config.Settings, sync: str = "normal", lock_fd: int = -1) -> None:
        self.db = db
        self.cfg = cfg
        self.stop = False
        self.lock_fd = lock_fd if lock_fd >= 0 else take_lock(db)
        os.ftruncate(self.lock_fd, 0)
        os.write(self.lock_fd, f"{os.getpid()}\n".encode())
        self.clients_fd = paths.open_private(paths.clients_path(db), strict=True)
        self.store = SQLiteStore(db, sync)
        #: The C turn for plain submits (None: every turn in Python).  Made
        #: once the segment is open: its statements would keep a store that
        #: failed before then from closing (and a rebuild's jobs go uncached).
        self.native: Optional[NativeTurn] = None
        self.name = paths.segment_name(db)
        #: Group name -> (index in the segment, concurrency limit).
        self.groups: Dict[str, Tuple[int, int]] = self.store.groups()
        #: Limited groups: index -> limit; and name -> index.
        self.limited: Dict[int, int] = {}
        self.gates: Dict[str, int] = {}
        self._read_limits()
        self.seg, rebuilt = self._open_segment()
        self._apply_group_limits(self.seg)
        clean = self.store.meta_get("clean", 0)
        with self.store.transaction():
            self.store.meta_set("clean", 0)
            # The submit events the C turn of a writer that died still held.
            self.store.repair_events(self.seg.reserve_seq(0), lost=not clean)
        if not rebuilt and not clean:
            self._reconcile()
        if not clean:
            with self.store.transaction():
                self.store.recount()
        #: Totals committed but not yet added to the counters table (upkeep
        #: writes them; a crash loses them and the next start recounts).
        self.totals: Dict[str, int] = {}
        #: Spilled tasks whose spill row the disk refused (written again by upkeep).
        self.unspilled: List[SpillRow] = []
        #: Whether the database refuses writes (a full disk, say).
        self.failing = False
        self._read_spill()
        self.flush_seq = int(self.store.meta_get("flush_seq", 0))
        self.seg.set_flush_seq(self.flush_seq)
        #: Where the next purge pass starts looking (task id).
        self.purge_cursor = 0
        #: A walk of every task by age ("round") began at this time (us), and
        #: the oldest end it met that was kept; once a round is over, nothing
        #: can be old enough before the older of the two plus the retention.
        self.purge_round = (0, 0)
        self.purge_idle_until = 0
        #: Tasks waiting on dependencies (kept in memory so that flushes skip the lookup when none do).
        self.waiting_n = self.store.waiting_count()
        #: Task definitions that workers registered: name -> (max_attempts, timeout_ms, backoff).
        defs = self.store.definitions()
        self.defs = {n: d[:3] for n, d in defs.items()}
        self.native = self.store.native_turn(cfg.event_delay) if cfg.native_turn else None
        #: Whether the C turn still has to learn of a change to self.defs.
        self.defs_changed = True
        #: The C turn loop waited for requests until the run loop's time: do not wait again.
        self.waited = False
        #: Processes that defined each task (a periodic one fires only while one lives).
        self.definers: Dict[str, set] = {}
        #: Periodic tasks: name -> [every_us, cron, prio, next_at].
        self.schedules = {n: list(d[3:]) for n, d in defs.items() if d[3] or d[4]}
        head, tail = self.seg.req_bounds()
        self.scan = head
        # A record published before this writer started may have been
        # committed by the last one, which died before it answered.
        self.replay_before = tail
        #: A record being streamed that the writer stopped working ahead on
        #: (it stalled, or the turn failed): handled whole once it is READY.
        self.no_stream_at = -1
        #: Set by _gather: the RESERVED record it stopped at has parts to start on.
        self.stream_head: Optional[Any] = None
        #: The last turn left work behind (a chunk's worth of requests, or a
        #: full flush): the next one starts at once instead of waiting.
        self.more = False
        self.dirty_buf = Segment.dirty_records(cfg.flush_rows)
        self.last_flush = time.monotonic()
        self.upkeep = Upkeep(self)
        shm.set_wait_spin(cfg.writer_spin_us)
        # With synchronous=FULL every commit syncs the WAL: nothing is left to sync.
        self.wal_sync = WalSync(db + "-wal") if sync != "full" else None

    # ---- the segment ------------------------------------------------------------

    def _open_segment(self) -> Tuple[Segment, bool]:
        gen = self.store.meta_get("generation")
        old_next_id = 0
        try:
            seg = Segment.attach(self.name)
        except errors.SegmentNotFound:
            seg = None
        except errors.SegmentError as e:
            print(f"headrace writer: segment unusable ({e}); rebuilding it from the database", file=sys.stderr)
            seg = None
        if seg is not None:
            try:
                if gen is not None and seg.generation == int(gen):
                    seg.verify()
                    return seg, False
                old_next_id = seg.info()["next_id"]
            except errors.SegmentError as e:
                print(f"headrace writer: segment fails verification ({e}); rebuilding it", file=sys.stderr)
            seg.close()
        return self._rebuild(old_next_id), True

    def _rebuild(self, old_next_id: int) -> Segment:
        """A new segment holding every live task, swapped in atomically."""
        # Only a writer rebuilds, and we hold the lock: any half-built
        # segment left here is from a writer that died rebuilding.
        stale = shm.PREFIX + self.name + paths.TEMP_MARK
        for f in os.listdir(shm.SHM_DIR):
            if f.startswith(stale):
                Segment.unlink(f[len(shm.PREFIX):])
        tmp = f"{self.name}{paths.TEMP_MARK}{os.getpid()}"
        # The segment names its database, so that one left by a killed writer
        # is removed once the database is gone (paths.stale_segments).
        note = os.fsencode(self.db)
        seg = Segment.create(tmp, self.cfg.capacity, req_bytes=self.cfg.request_bytes,
                             note=note if len(note) <= shm.NOTE_MAX else b"")
        try:
            return self._fill(seg, old_next_id)
        except BaseException:
            seg.close()
            Segment.unlink(tmp)  # a database we cannot read leaves no half-built segment behind
            raise

    def _fill(self, seg: Segment, old_next_id: int) -> Segment:
        """Place every live task in new segment `seg` (the rest spilled), then swap it in."""
        self._apply_group_limits(seg)
        fill = self._fill_target(seg.capacity)
        live = self.store.live()
        batch: List[Any] = []
        spilled: List[SpillRow] = []
        members: Dict[int, int] = {}
        max_seq = placed = 0
        for row in live:
            max_seq = max(max_seq, row[2])
            gate = self._gate(row)
            if gate:
                members[gate] = members.get(gate, 0) + 1
            if placed < fill and (not gate or members[gate] <= self._quota(gate, seg.capacity)):
                batch.append(row)
                placed += 1
                if len(batch) >= 4096:
                    self._place(seg, batch)
                    batch = []
            else:
                spilled.append(self._spill_row(row))
        self._place(seg, batch)
        first = seg.reserve_seq(0)
        if max_seq >= first:
            seg.reserve_seq(max_seq - first + 1)
        seg.raise_next_id(max(self.store.max_id(), old_next_id) + ID_GAP)
        with self.store.transaction():
            self.store.spill_reset(spilled)
            self.store.meta_set("generation", seg.generation)
        os.rename(seg.path, shm.segment_path(self.name))
        seg.path = shm.segment_path(self.name)
        return seg

    def _fill_target(self, capacity: int) -> int:
        """Slots a refill fills up to; the rest stays free for new high-priority work."""
        return max(1, capacity - int(capacity * self.cfg.refill_free / 2))

    def _place(self, seg: Segment, rows: Sequence[Any], packed: Any = None) -> List[Any]:
        """Insert live rows (store.LiveRow): pending, or delayed while their
        run-at is ahead (`packed`: already packed by :meth:`_pack`), their
        jobs in the job cache (see :meth:`_cache`); returns the rows that
        did not fit."""
        if not rows:
            return []
        packed = self._pack(rows) if packed is None else packed
        self._cache(seg, rows, packed)
        return self._push(seg, rows, packed)

    def _cache(self, seg: Segment, rows: Sequence[Any], packed: Any) -> None:
        """Copy the jobs of rows about to be placed into the segment's job
        cache, in C on the writer's warm connection, so that the claiming
        workers need not read them (the C turn caches what it places itself;
        without it, the workers read every job)."""
        if self.native is None:
            return
        try:
            self.native.cache(seg.handle, packed, len(rows))
        except errors.EngineError:
            pass  # the workers read them themselves

    def _pack(self, rows: Sequence[Any]) -> Any:
        """The ``hr_task[]`` of live rows (a task whose run-at is ahead is delayed)."""
        now = now_us()
        groups = self.groups
        return shm.pack_tasks([(tid, prio, seq, shm.DELAYED if run_at > now else shm.PENDING, run_at, dedup,
                                attempt, max_attempts, timeout_ms, backoff, groups[grp][0] if grp else 0)
                               for tid, prio, seq, run_at, dedup, attempt, max_attempts, timeout_ms, backoff, grp
                               in rows])[0]

    def _push(self, seg: Segment, rows: Sequence[Any], packed: Any) -> List[Any]:
        """Insert rows packed by :meth:`_pack`; returns those that did not fit."""
        n = len(rows)
        out, ok = seg.push_batch(packed, n)
        if ok == n:
            return []
        return [rows[k] for k in range(n) if out[k] == shm.lib.HR_E_FULL]

    def _reconcile(self) -> None:
        """After a crash with the segment intact: every live task is in the
        segment or in the spill store, never in neither."""
        rows = [self._spill_row(r) for r in self.store.live() if self.seg.get(r[0]) is None]
        with self.store.transaction():
            self.store.spill_reset(rows)

    def _read_spill(self) -> None:
        """Reload the spill store's size, gates and best rank (kept in memory between changes)."""
        self.spill_n = self.store.spill_count()
        #: Spilled tasks per limited group (gate > 0).
        self.gate_n: Dict[int, int] = self.store.spill_gates()
        self._read_spill_top()

    def _read_spill_top(self) -> None:
        best = self.store.spill_best()
        self.spill_top = None if best is None else _rank(*best)

    def _read_limits(self) -> None:
        self.limited = {idx: limit for idx, limit in self.groups.values() if limit}
        self.gates = {name: idx for name, (idx, limit) in self.groups.items() if limit}

    def _quota(self, gate: int, capacity: int) -> int:
        """Slots a limited group's tasks may hold: its limit, and as many
        again waiting or its share of the segment, whichever is more."""
        limit = self.limited[gate]
        return limit + max(limit, capacity // (GROUP_SHARE * len(self.limited)))

    def _gate(self, r: LiveRow) -> int:
        """The spill partition of a live row: its group's index if the group is limited, else 0."""
        return self.gates.get(r[9], 0)

    def _spill_row(self, r: LiveRow) -> SpillRow:
        return r[1], r[2], r[0], self._gate(r)

    def _hold_back(self, rows: List[LiveRow]) -> Tuple[List[LiveRow], List[SpillRow]]:
        """Split rows about to enter the segment: tasks of a limited group
        beyond its quota (or behind its spilled backlog) wait in its gate."""
        if not self.gates or not rows:
            return rows, []
        by_gate: Dict[int, List[LiveRow]] = {}
        keep = []
        for r in rows:
            gate = self._gate(r)
            if gate:
                by_gate.setdefault(gate, []).append(r)
            else:
                keep.append(r)
        back: List[SpillRow] = []
        for gate, rs in by_gate.items():
            room = 0
            if not self.gate_n.get(gate):  # else FIFO: they queue behind the group's spilled ones
                room = self._quota(gate, self.seg.capacity) - self.seg.group_info(gate)["members"]
            if room < len(rs):
                rs.sort(key=_live_rank)
                back.extend(self._spill_row(r) for r in rs[max(0, room):])
                rs = rs[:max(0, room)]
            keep.extend(rs)
        return keep, back

    # ---- one turn ------------------------------------------------------------------

    def _gather(self) -> List[Tuple[Any, int, list]]:
        """Published requests from the scan position, up to one chunk of items."""
        recs: List[Tuple[Any, int, list]] = []
        n = 0
        pos = self.scan
        seg = self.seg
        self.stream_head = None
        self.more = True
        while True:
            h = seg.req_next(pos)
            if h is None:
                self.more = False  # every published request is taken
                break
            if h.state == shm.REQ_READY:
                try:
                    data = seg.req_read(h.pos, h.nbytes)
                    # A record with a tag was sent in parts.
                    mode, items = (protocol.decode_streamed if h.tag else protocol.decode_request)(data)
                except Exception as e:  # never let one bad record stop the writer
                    print(f"headrace writer: request {h.pos} from pid {h.pid} is malformed ({e}); "
                          "refusing it", file=sys.stderr)
                    seg.req_answer(h.pos, protocol.encode_error(f"malformed request: {e}"))
                    seg.notify(shm.EV_COMMIT)
                    pos = h.pos + h.len
                    continue
                if recs and n + len(items) > self.cfg.chunk:
                    pos = h.pos
                    break
                recs.append((h, mode, items))
                n += len(items)
            elif h.state == shm.REQ_RESERVED:
                if paths.pid_alive(h.pid):
                    pos = h.pos
                    # Its first parts are there: start on them, unless it needs the replay check
                    # (published before this writer started) or working ahead on it stopped once.
                    ahead = bool(h.tag) and h.pos >= self.replay_before and h.pos != self.no_stream_at
                    if ahead and not recs:
                        self.stream_head = h
                    # Else its publish wakes us, or (behind this turn's requests) the next turn starts on it.
                    self.more = ahead
                    break  # its producer is still writing it
                if not seg.req_cas_state(h.pos, shm.REQ_RESERVED, shm.REQ_ABANDONED):
                    continue  # published after all, then its producer died: read it again
            pos = h.pos + h.len
        self.scan = pos
        return recs

    def turn(self, force_flush: bool = False) -> bool:
        """Commit what has arrived; returns whether there was anything."""
        native = self.native is not None and not force_flush and self._unhindered() and not faults._armed
        if native:
            done = self._native_turn()
            if done is not None:
                return done
        # Before a Python turn writes outcomes: a task's submit event comes first.
        self.write_held_events(force=True)
        recs = self._gather()
        if self.stream_head is not None:
            return self._stream_turn(self.stream_head)
        if recs and native and self._plain(recs):
            # The C turn stopped at a record still being sent in parts, which
            # its producer has finished since: the C turn takes it whole.
            self.scan = recs[0][0].pos
            done = self._native_turn()
            if done is not None:
                return done
            recs = self._gather()
        if recs and not force_flush and self._plain(recs):
            return self._plain_turn(recs)
        reports = [r for r in recs if r[1] == protocol.REPORT]
        manage = [r for r in recs if r[1] == protocol.MANAGE]
        if reports or manage:
            recs = [r for r in recs if r[1] not in (protocol.REPORT, protocol.MANAGE)]
        seg = self.seg
        dirty_n, epoch = 0, 0
        now = time.monotonic()
        # A management request is answered after a flush of what was reported
        # before it (dead_letters must see a task that just died).
        due = recs or manage or force_flush or self._flush_due(now)
        if due and seg.raw_info().ring_size:
            _, dirty_n, epoch = seg.peek_dirty(self.cfg.flush_rows, self.dirty_buf)
        if not recs and not dirty_n and not reports and not manage:
            return False
        if dirty_n >= self.cfg.flush_rows:
            self.more = True  # the ring may hold more
        plan = _Plan()
        try:
            with self.store.transaction():
                for h, mode, items in recs:
                    self._decide(plan, h, mode, items)
                self._write_new(plan)
                for h, _, items in reports:
                    self.store.put_results([(tid, attempt, kind, body)
                                            for tid, _slot, attempt, kind, _r, _d, body in items])
                if dirty_n:
                    self._write_dirty(plan, dirty_n)
                    # Readers match this against the segment's to count each
                    # finished task once (see Queue.stats).
                    self.store.meta_set("flush_seq", self.flush_seq + 1)
                for h, _, items in manage:  # after the flush: they see its outcomes
                    try:
                        self._manage(plan, h, items[0])
                    except (errors.EngineError, TypeError, ValueError) as e:
                        # Refuse this command alone; a bad one must not stop the writer.
                        plan.answers.append((h, protocol.encode_error(f"{type(e).__name__}: {e}")))
                faults.point("commit")
        except Exception as e:
            return self._refuse(e, recs + manage, reports)
        faults.point("committed")
        self.store_ok()
        if dirty_n:
            # At once: until the advance, the flushed outcomes are in both the
            # database and the segment, and Queue.stats waits for the two to agree.
            self.last_flush = now
            self.flush_seq += 1
            try:
                seg.advance_dirty(dirty_n, epoch, self.flush_seq)
            except errors.Stale:
                pass  # the ring was rebuilt by a repair; the next peek sees it all again
        self._after_commit(plan)
        for h, _, items in reports:
            self._settle(items)
            seg.req_set_state(h.pos, shm.REQ_DONE)  # nobody reads an answer
        for h, answer in plan.answers:
            seg.req_answer(h.pos, answer)
        if plan.answers:
            seg.notify(shm.EV_COMMIT)
        if plan.revive:  # once their dead slots are freed (by the advance above)
            self._place_or_spill(self.store.tasks_for(plan.revive))
        if plan.ready_children:  # their dependencies completed
            self._place_or_spill(self.store.tasks_for(plan.ready_children))
        return True

    def _refuse(self, e: Exception, recs: List[Tuple[Any, int, list]], reports: List[Tuple[Any, int, list]]) -> bool:
        """A turn that failed was rolled back: refuse its requests, whatever
        the error, and carry on (a writer that died on a request would meet it
        again, replayed, after every restart); its reports are stored later."""
        seg = self.seg
        msg = f"{type(e).__name__}: {e}"
        if isinstance(e, apsw.Error):
            self.store_failed(e)
        else:
            print(f"headrace writer: commit failed ({msg}); nothing of this turn was stored", file=sys.stderr)
        for h, _, _ in recs:
            seg.req_answer(h.pos, protocol.encode_error(msg))
        if recs:
            seg.notify(shm.EV_COMMIT)
        if isinstance(e, (apsw.Error, OSError)) or recs:
            # Stored later, not dropped (next turn without the requests refused here).
            self.scan = min([h.pos for h, _, _ in reports] + [self.scan])
        else:  # the reports alone cannot be stored: retrying them would wedge every turn
            self._drop_reports(reports)
        self._rolled_back()
        time.sleep(0.05)
        self.more = True
        return True

    def _unhindered(self) -> bool:
        """No limited group and nothing spilled: new plain tasks go straight
        to the segment, as the plain turns (Python's and C's) assume."""
        return not self.gates and self.spill_top is None and not self.spill_n

    def _flush_due(self, now: float) -> bool:
        """Whether the dirty ring's timed flush is due (`now`: time.monotonic())."""
        return now - self.last_flush >= self.cfg.flush_interval

    def _plain(self, recs: List[Tuple[Any, int, list]]) -> bool:
        """Whether this turn is submits of plain jobs only (no dedup key,
        group, dependency or tag; nothing to check against a replay) that
        all fit in the segment ahead of an empty spill store, with no flush
        due: the common case, which :meth:`_plain_turn` commits with none of
        the general machinery."""
        if not self._unhindered():
            return False
        n = 0
        for h, mode, items in recs:
            if mode not in _PLAIN_MODES or h.pos < self.replay_before:
                return False
            if any(map(_DEDUP, items)) or any(map(_GROUP, items)) or any(map(_DEPS, items)) or any(map(_TAGS, items)):
                return False
            n += len(items)
        info = self.seg.raw_info()
        if info.ring_size and self._flush_due(time.monotonic()):
            return False  # the general turn flushes too
        return info.nfree >= n

    def _plain_turn(self, recs: List[Tuple[Any, int, list]]) -> bool:
        """Commit a turn that :meth:`_plain` accepted: insert, commit, place, answer."""
        new = [it for _, _, items in recs for it in items]
        rows = self._rows(new)
        try:
            with self.store.transaction():
                self.store.log_submits(_submit_events([([it[0] for it in items], items[0][9])
                                                       for _, _, items in recs if items]))
                self.store.insert_tasks(rows, [(it[0], it[2]) for it in new])
                faults.point("commit")
        except Exception as e:
            return self._refuse(e, recs, [])
        faults.point("committed")
        self.store_ok()
        self._add_totals({"submitted": len(rows), "submit_txns": 1})
        self._place_or_spill(_live(rows), held=True)
        seg = self.seg
        for h, _, items in recs:
            seg.req_answer(h.pos, protocol.encode_inserted([it[0] for it in items]))
        seg.notify(shm.EV_COMMIT)
        return True

    def _native_turn(self) -> Optional[bool]:
        """Commit the plain submits from the scan position in C, turn after
        turn, waiting for more in between (see csrc/turn.h): True if it
        committed any, False if not, None for the Python turn now (which also
        meets any error the C turn met).  While submits keep coming, the
        writer stays in C until a flush or an upkeep pass is due."""
        self._native_defs()
        now = time.monotonic()
        cfg = self.cfg
        # Back in time for the next upkeep pass, and for a stop signal.
        wait = max(0.0, min(cfg.flush_interval, self.upkeep.next_pass - now, NATIVE_WAIT))
        out = self.native.loop(self.seg.handle, self.scan, self.replay_before, cfg.chunk,
                               self.last_flush + cfg.flush_interval - now, wait, cfg.checkpoint_pages)
        self.stream_head = None
        stopped = out.stopped
        if out.items:
            self.scan = out.scan
            self.store_ok()
            self._add_totals({"submitted": out.items, "submit_txns": out.turns})
            self._spill_unplaced(out)
        if stopped == shm.lib.HR_TURN_OTHER:
            self.more = True  # what it stopped at is the Python turn's, at once
            return True if out.items else None
        self.more = False
        # HR_TURN_END: it waited its time already; HR_TURN_DUE: the run loop's upkeep now.
        self.waited = stopped == shm.lib.HR_TURN_END
        return bool(out.items)

    def write_held_events(self, force: bool) -> None:
        """Write the one-by-one submits' events the C turn holds: the due
        ones, or (`force`) all.  One the disk refuses stays held; the turns
        meet the disk's error themselves."""
        if self.native is not None:
            self.native.events(self.seg.handle, force)

    def _native_defs(self) -> None:
        """Tell the C turn the definitions, if they changed."""
        if self.defs_changed:
            self.native.set_definitions(self.defs)
            self.defs_changed = False

    def _spill_unplaced(self, out: Any) -> None:
        """Spill the tasks a C turn committed that the segment refused (``hr_turn_out``)."""
        if out.unplaced:  # they stay live on disk
            full = shm.lib.HR_E_FULL
            n = out.last  # the last turn's: the only one that can have left some unplaced
            self._spill_now([(t.prio, t.seq, t.id, 0) for t, rc in zip(out.tasks[0:n], out.status[0:n]) if rc == full])

    def _add_totals(self, counts: Dict[str, int]) -> None:
        """Count a committed turn's counts into the totals upkeep writes."""
        for k, v in counts.items():
            self.totals[k] = self.totals.get(k, 0) + v

    def _rows(self, new: List[protocol.Item]) -> List[TaskRow]:
        """The task rows of new items, in a FIFO sequence reserved now."""
        first = self.seg.reserve_seq(len(new))
        # Item: protocol.Item; row: store.TaskRow
        return [(it[0], it[1], it[4], first + k, it[9], it[6], it[5], it[8], it[7], it[3], it[10], it[11])
                if it[10] >= 0 else self._defined(it, first + k) for k, it in enumerate(new)]

    def _rolled_back(self) -> None:
        """Reload what a rolled-back turn may have changed in memory."""
        self._read_spill()  # spills it counted
        self.waiting_n = self.store.waiting_count()  # ... waiting dependents
        self.groups = self.store.groups()  # ... new groups
        self._read_limits()

    def _stream_turn(self, h: Any) -> bool:
        """Work ahead on a request its producer is still writing in parts (a
        submit_batch chunk): insert each part as it arrives, in one
        transaction that commits once the request is READY, so that the
        producer serialises part k+1 while the writer stores part k.  Parts
        of plain jobs go through the C turn, where there is one and nothing
        hinders it (as for :meth:`_native_turn`).

        Only parts of plain jobs (no dedup key) of a record published since
        this writer started are taken this way.  If the producer dies, the
        transaction is rolled back and the record abandoned: nothing of the
        chunk is stored.  If it stalls, or
        anything else goes wrong, the work is rolled back and the record is
        handled whole once it is READY, as any other request."""
        seg = self.seg
        pos = h.pos
        plan = _Plan()
        done = 0  # data bytes taken so far
        ids: List[int] = []
        created = 0
        native = self.native if self._unhindered() else None
        if native is not None:
            self._native_defs()
        try:
            with self.store.transaction():
                last_part = time.monotonic()
                while True:
                    seen = seg.event(shm.EV_WRITER)
                    h = seg.req_get(pos)
                    if h is None or h.state not in (shm.REQ_RESERVED, shm.REQ_READY):
                        raise _StreamStopped("its producer abandoned it")
                    have = h.nbytes if h.state == shm.REQ_READY else h.tag
                    if have > done:
                        if native is not None and not done and \
                                seg.req_read(pos, 4, protocol.FRAME_HEAD) != protocol.PLAIN_MAGIC_BYTES:
                            native = None  # parts the Python turn decodes
                        if native is not None:
                            out = native.part(seg.handle, pos, done, have)
                            if out.stopped != shm.lib.HR_TURN_END:
                                raise _StreamStopped(f"a part the C turn does not take (SQLite {out.sql_rc})")
                        else:
                            created = self._stream_part(plan, seg.req_read(pos, have - done, done), ids, created)
                        done = have
                        last_part = time.monotonic()
                    if h.state == shm.REQ_READY:
                        break
                    if have == done:
                        if plan.place:  # idle until the next part: pack what this turn will place
                            plan.packed.append((plan.place, self._pack(plan.place)))
                            plan.place = []
                            continue
                        if not paths.pid_alive(h.pid):
                            if seg.req_cas_state(pos, shm.REQ_RESERVED, shm.REQ_ABANDONED):
                                raise _StreamStopped("its producer died")
                            continue  # it published the record, then died: take the rest
                        if time.monotonic() - last_part > STREAM_STALL:
                            raise _StreamStopped("no new part came")
                        seg.wait(shm.EV_WRITER, seen, 0.002)
                if native is not None:
                    if native.part_log().stopped != shm.lib.HR_TURN_END:
                        raise _StreamStopped(f"its submit event (SQLite {native.out.sql_rc})")
                else:
                    if ids:
                        plan.requests.append((ids, created))
                        self._write_new(plan)  # logs the submit
                    plan.answers.append((h, protocol.encode_inserted(ids)))
                plan.count("streamed")  # requests the writer worked ahead on
                faults.point("commit")
        except Exception as e:  # rolled back; the record is handled whole when READY (or was abandoned)
            if not isinstance(e, _StreamStopped):
                if isinstance(e, apsw.Error):
                    self.store_failed(e)
                else:
                    print(f"headrace writer: working ahead on request {pos} failed ({type(e).__name__}: {e}); "
                          "it is handled whole instead", file=sys.stderr)
            self.no_stream_at = pos
            self._rolled_back()
            return True
        faults.point("committed")
        self.store_ok()
        if native is not None:
            out = native.part_place(seg.handle, pos, now_us())
            plan.count("submitted", out.items)
            plan.count("submit_txns")
            self._add_totals(plan.counts)
            self._spill_unplaced(out)
        else:
            self._after_commit(plan)
            for rec, answer in plan.answers:
                seg.req_answer(rec.pos, answer)
            seg.notify(shm.EV_COMMIT)
        self.scan = pos + h.len
        return True

    def _stream_part(self, plan: "_Plan", data: bytes, ids: List[int], created: int) -> int:
        """Insert the parts in `data` of a streamed request (their ids go to
        `ids`); returns the request's time (`created`, if it was known)."""
        for mode, items in protocol.decode_frames(data):
            if mode not in _PLAIN_MODES:  # replay, reports, commands
                raise _StreamStopped(f"a part in mode {mode:#x}")
            if any(map(_DEDUP, items)):
                raise _StreamStopped("a part that needs deduplication")
            if items:
                created = created or items[0][9]
                ids.extend(it[0] for it in items)
                plan.new.extend(items)
                self._write_new(plan)
        return created

    def _after_commit(self, plan: "_Plan") -> None:
        """Committed: now the segment may show it."""
        self._add_totals(plan.counts)
        for idx, limit in plan.limits:
            self.seg.set_group_limit(idx, limit)
        for tid in plan.cancel_live:
            try:
                self.seg.cancel(tid)
            except (errors.TaskNotFound, errors.InvalidState):
                pass
        rows, packed = plan.place, None
        if plan.packed:  # packed while a streamed request's parts came in: one insert (one wake-up) for all
            if plan.place:
                plan.packed.append((plan.place, self._pack(plan.place)))
            rows = [r for part, _ in plan.packed for r in part]
            packed = shm.join_tasks([(arr, len(part)) for part, arr in plan.packed])
        self._place_or_spill(rows, held=True, packed=packed)
        if plan.swap:
            self.rebalance()  # before answering: a claim after the submit sees the best task

    def _place_or_spill(self, rows: List[LiveRow], held: bool = False, packed: Any = None) -> None:
        """Place rows in the segment (`packed` as :meth:`_place` takes it);
        what does not fit (or is `_hold_back`'s, unless `held` says that was
        decided already) is spilled."""
        rows, back = (rows, []) if held else self._hold_back(rows)
        back.extend(map(self._spill_row, self._place(self.seg, rows, packed)))
        if back:  # the segment is full, or their group's share is; they stay live on disk
            self._spill_now(back)

    def _spill_now(self, rows: List[SpillRow]) -> bool:
        """Spill `rows` in a transaction of their own.  If the disk refuses,
        they are kept (live on disk, in neither place for now) and spilled
        again by the next upkeep pass; returns whether it worked."""
        try:
            with self.store.transaction():
                self._spill(rows)
            return True
        except apsw.Error as e:
            self._spill_refused(e, rows)
            return False

    def _spill_refused(self, e: apsw.Error, rows: List[SpillRow]) -> None:
        """A spill transaction the disk refused: reload what the rollback
        undid, and keep `rows` for the next upkeep pass."""
        self._read_spill()
        self.unspilled.extend(rows)
        self.store_failed(e)

    def store_failed(self, e: BaseException) -> None:
        """Say once that the database refuses writes (not every 50 ms while a disk is full)."""
        if not self.failing:
            print(f"headrace writer: the database refuses writes ({type(e).__name__}: {e}); "
                  "nothing is lost: submits get an error, outcomes wait in memory until it takes them",
                  file=sys.stderr)
        self.failing = True

    def store_ok(self) -> None:
        if self.failing:
            print("headrace writer: the database takes writes again", file=sys.stderr)
        self.failing = False

    def _decide(self, plan: "_Plan", h: Any, mode: int, items: list) -> None:
        """Authoritative dedup for one request; fills the plan and its answer."""
        n = len(items)
        if not mode & protocol.REPLAY and h.pos >= self.replay_before and not any(map(_DEDUP, items)):
            plan.new.extend(items)  # no dedup key, no replay: every job is new
            plan.answers.append((h, protocol.encode_inserted([it[0] for it in items])))
            plan.requests.append(([it[0] for it in items], items[0][9]))
            return
        kinds = bytearray(n)
        ids = [0] * n
        others = [0] * n
        replay: Any = ()
        if mode & protocol.REPLAY or h.pos < self.replay_before:
            replay = set(self.store.existing([it[0] for it in items]))
        mode &= ~protocol.REPLAY
        last: Dict[bytes, int] = {}
        for k, it in enumerate(items):
            if it[5] is not None:
                last[it[5]] = k
        for k, it in enumerate(items):
            tid, dedup = it[0], it[5]
            if dedup is not None and last[dedup] != k:
                continue  # an earlier twin in this batch: the last one wins
            if tid in replay:
                kinds[k], ids[k] = protocol.INSERTED, tid
                continue
            if dedup is not None:
                old = self._live_holder(plan, dedup)
                if old is not None:
                    if mode == protocol.ON_DUPLICATE["skip"]:
                        kinds[k], ids[k] = protocol.DUPLICATE, old
                        continue
                    if mode == protocol.ON_DUPLICATE["reject"]:
                        kinds[k], ids[k] = protocol.REJECTED, old
                        continue
                    self._supersede(plan, old)
                    kinds[k], ids[k], others[k] = protocol.SUPERSEDED, tid, old
                else:
                    kinds[k], ids[k] = protocol.INSERTED, tid
                plan.keys[dedup] = tid
            else:
                kinds[k], ids[k] = protocol.INSERTED, tid
            plan.new.append(it)
        for k, it in enumerate(items):
            dedup = it[5]
            if dedup is not None and last[dedup] != k:
                w = last[dedup]
                kinds[k], ids[k] = protocol.DUPLICATE, ids[w]
        plan.answers.append((h, protocol.encode_answer(kinds, ids, others)))
        new = [ids[k] for k in range(n)
               if kinds[k] in (protocol.INSERTED, protocol.SUPERSEDED) and ids[k] not in replay]
        if new:
            plan.requests.append((new, items[0][9]))

    def _settle(self, reports: List[protocol.Report]) -> None:
        """Apply reported outcomes once their data is committed; a fenced
        (stale) attempt changes nothing, and its stored row is never read
        as the task's."""
        seg = self.seg
        for tid, slot, attempt, kind, retry, delay_us, _ in reports:
            ticket = shm.Ticket(tid, slot, attempt)
            if kind == protocol.RESULT:
                seg.finish(ticket, shm.COMPLETED)
            else:
                seg.fail(ticket, retry=bool(retry), delay_us=delay_us)

    def _drop_reports(self, reports: List[Tuple[Any, int, list]]) -> None:
        """Give up reports that cannot be stored: their attempts fail (and run
        again), so that their workers stop renewing leases for them."""
        for h, _, items in reports:
            print(f"headrace writer: dropped a report of {len(items)} outcomes from pid {h.pid} that cannot be "
                  "stored; those attempts count as failed", file=sys.stderr)
            for tid, slot, attempt, *_ in items:
                try:
                    self.seg.fail(shm.Ticket(tid, slot, attempt), retry=True, delay_us=-1)
                except errors.EngineError:
                    pass
            self.seg.req_set_state(h.pos, shm.REQ_DONE)

    def _manage(self, plan: "_Plan", h: Any, command: Tuple[str, tuple]) -> None:
        """A management request: its answer lists the ids it applied to."""
        name, args = command
        if name == "retry_dead":
            dead = self.store.dead_ids(list(args[0]))
            # Fresh attempts: its limit counts again from the attempts used;
            # attempt numbers keep rising, so an old attempt stays fenced.
            self.store.record_outcomes([(tid, last, shm.PENDING, now_us(), last) for tid, last in dead])
            plan.revive.extend(d[0] for d in dead)
            plan.count("revived", len(dead))
            plan.answers.append((h, protocol.encode_inserted([d[0] for d in dead])))
        elif name == "define":
            self._define(args[0], h.pid)
            plan.answers.append((h, protocol.encode_inserted([])))
        elif name == "group_limit":
            gname, limit = args
            was = self.gates.get(gname, 0)
            idx = self._group(gname, limit)
            self._read_limits()
            if bool(was) != bool(limit) and self.spill_n:
                self.store.spill_regate(gname, idx if limit else 0)
                self._read_spill()
            plan.limits.append((idx, limit))
            plan.answers.append((h, protocol.encode_inserted([idx])))
        elif name == "cancel_group":
            done = [tid for tid in self.store.group_live(args[0]) if self._cancel(plan, tid)]
            plan.answers.append((h, protocol.encode_inserted([len(done)])))  # a count: it fits any answer
        elif name == "cancel_tagged":
            done = [tid for tid in self.store.tagged([tuple(kv) for kv in args[0]]) if self._cancel(plan, tid)]
            plan.answers.append((h, protocol.encode_inserted([len(done)])))
        elif name == "sync":  # answered once this turn's flush is committed
            plan.answers.append((h, protocol.encode_inserted([])))
        elif name == "verify":  # after this turn's flush: only what changed since may differ
            plan.answers.append((h, protocol.encode_inserted([self._check_agreement()])))
        elif name == "cancel":
            done = []
            for tid in args[0]:
                if self._cancel(plan, tid):
                    done.append(tid)
            plan.answers.append((h, protocol.encode_inserted(done)))
        else:
            plan.answers.append((h, protocol.encode_error(f"unknown command {name!r}")))

    def _define(self, defs: Sequence[Sequence[Any]], pid: int) -> None:
        """Record task definitions (name, max_attempts, timeout_ms, backoff,
        every_us, cron, prio) from process `pid`; a periodic one keeps its
        next run unless its schedule changed."""
        now = now_us()
        rows = []
        for name, max_attempts, timeout_ms, backoff, every_us, cron_expr, prio in defs:
            self.definers.setdefault(name, set()).add(pid)
            old = self.schedules.get(name)
            if not every_us and not cron_expr:
                self.schedules.pop(name, None)
                nxt = 0
            elif old is not None and old[:2] == [every_us, cron_expr]:
                nxt = old[3]
            else:
                nxt = cron.next_tick(every_us, cron_expr, 0, now)
            if every_us or cron_expr:
                self.schedules[name] = [every_us, cron_expr, prio, nxt]
            self.defs[name] = (max_attempts, timeout_ms, backoff)
            self.defs_changed = True
            rows.append((name, max_attempts, timeout_ms, backoff, every_us, cron_expr, prio, nxt))
        self.store.define(rows)

    def purge(self) -> int:
        """Delete finished tasks past their retention: one batch of tasks
        looked at per call, walking the ids round; returns how many went."""
        cfg = self.cfg
        if not cfg.retention and not cfg.retention_count:
            return 0
        excess = 0
        if cfg.retention_count:
            done, dead, cancelled, purged = self.store_totals(("completed", "dead", "cancelled", "purged"))
            finished = done + dead + cancelled - purged
            excess = max(0, finished - cfg.retention_count)
        now = now_us()
        cutoff = now - int(cfg.retention * 1e6) if cfg.retention else -1
        if excess:  # over the count: the oldest go first, so look from the start
            rows = self.store.finished_after(0, cfg.purge_batch)
        elif now < self.purge_idle_until:  # by age, and nothing can be old enough yet
            rows = []
        elif not self.purge_cursor and self._all_young(now, cutoff):
            rows = []
        else:  # by age: walk the ids round, a batch per pass
            if not self.purge_cursor:
                self.purge_round = (now, now)
            rows = self.store.finished_after(self.purge_cursor, cfg.purge_batch)
            self.purge_cursor = rows[-1][0] if len(rows) == cfg.purge_batch else 0
        doomed = []
        by_state: Dict[str, int] = {}
        kept = doomed_at = self.purge_round[1]
        for tid, state, at in rows:  # oldest ids first
            if state < shm.COMPLETED:
                continue  # it ends after the round began
            if (at < cutoff or len(doomed) < excess) and self.seg.get(tid) is None:
                doomed.append(tid)
                doomed_at = min(doomed_at, at)
                key = "purged_" + _TERMINAL_NAMES[state]
                by_state[key] = by_state.get(key, 0) + 1
            else:
                kept = min(kept, at)
        try:
            if doomed:
                with self.store.transaction():
                    self.store.purge(doomed)
                    self.store.bump({"purged": len(doomed), **by_state})
        except BaseException:
            kept = min(kept, doomed_at)  # still there (a full disk, say): the round must not rest past them
            raise
        finally:
            if rows and not excess:
                self.purge_round = (self.purge_round[0], kept)
                if not self.purge_cursor and cfg.retention:  # the round is over
                    # A task that ends later ends after the round began.
                    self.purge_idle_until = min(self.purge_round) + int(cfg.retention * 1e6)
        if cfg.retention and self.store.oldest_event_at() < cutoff:  # the event log keeps the same time
            with self.store.transaction():
                self.store.purge_events(cutoff, cfg.purge_batch)
        return len(doomed)

    def _all_young(self, now: int, cutoff: int) -> bool:
        """Before a round by age: whether no task can be old enough, every
        outcome being from after the cutoff; if so, rest until the oldest
        one (or, with none, one written from now on) is past the retention.
        A round walks every task, and at a steady stream of submits it never
        ended: a pass of 2,000 tasks took ~3 ms, every purge_interval."""
        oldest = self.store.oldest_outcome_at()
        if oldest is not None and oldest < cutoff:
            return False
        self.purge_idle_until = (now if oldest is None else oldest) + int(self.cfg.retention * 1e6)
        return True

    def store_totals(self, names: Sequence[str]) -> List[int]:
        """Running totals: on disk plus those committed but not yet written."""
        counters = self.store.counters()
        return [counters.get(n, 0) + self.totals.get(n, 0) for n in names]

    def fire_schedules(self) -> None:
        """Submit one instance of each periodic task whose time came, and
        move its next run on, in one transaction: one run per tick however
        many processes define it, and a crash cannot fire a tick twice."""
        now = now_us()
        # Only while a process that defines it lives: a periodic task dropped
        # from the code stops, and ticks missed while no worker ran are made
        # up once when one comes back.
        due = [(name, sc) for name, sc in self.schedules.items() if sc[3] <= now and self._defined_live(name)]
        if not due:
            return
        first = self.seg.reserve_ids(len(due))
        plan = _Plan()
        body = b"[[],{}]"  # no arguments, as JSON
        for k, (name, (every_us, cron_expr, prio, nxt)) in enumerate(due):
            max_attempts, timeout_ms, backoff = self.defs.get(name, (0, 0, 0))
            plan.new.append((first + k, name, body, 0, prio, None, 0, max_attempts, None, now, timeout_ms,
                             backoff, None, None))
            plan.requests.append(([first + k], now))
        nexts = {name: cron.next_tick(sc[0], sc[1], sc[3], now) for name, sc in due}
        with self.store.transaction():
            self._write_new(plan)
            self.store.set_next_runs(nexts)
        for name, t in nexts.items():
            self.schedules[name][3] = t
        self._after_commit(plan)

    def _defined_live(self, name: str) -> bool:
        pids = self.definers.get(name, set())
        pids.difference_update([p for p in pids if not paths.pid_alive(p)])
        return bool(pids)

    def _live_holder(self, plan: "_Plan", dedup: bytes) -> Optional[int]:
        tid = plan.keys.get(dedup)
        if tid is not None:
            return tid
        slot = self.seg.dedup_lookup(shm.split_key(dedup))
        if slot is not None:
            return self.seg.read_slot(slot).id
        if self.spill_n:
            return self.store.spill_find_dedup(dedup)
        return None

    def _supersede(self, plan: "_Plan", old: int) -> None:
        for i, it in enumerate(plan.new):
            if it[0] == old:  # inserted earlier in this same turn: never stored at all
                del plan.new[i]
                return
        self._cancel(plan, old)

    def _cancel(self, plan: "_Plan", tid: int) -> bool:
        """Cancel a live task: in the segment after the commit, or in the
        spill store now.  False if it is not live."""
        live = self.seg.get(tid)
        if live is not None:
            if live.state in shm.TERMINAL:
                return False
            plan.cancel_live.append(tid)
            return True
        gate = self.store.spill_remove(tid) if self.spill_n else None
        if gate is not None:
            self.spill_n -= 1
            if gate:
                self.gate_n[gate] -= 1
            self.store.record_outcomes([(tid, 0, shm.CANCELLED, now_us(), None)])
            plan.count("cancelled")
            return True
        if self.waiting_n and self.store.stop_waiting(tid):
            self.waiting_n -= 1
            self._cancel_waiting(plan, [tid])
            return True
        return False

    def _write_new(self, plan: "_Plan") -> None:
        """Insert this turn's new tasks; the best-ranked that fit go to the
        segment after the commit, the rest to the spill store now."""
        new, requests = plan.new, plan.requests
        plan.new, plan.requests = [], []  # a streamed request calls this once per part
        if requests:
            self.store.log_submits(_submit_events(requests))
            plan.count("submit_txns")
        if not new:
            return
        rows = self._rows(new)
        # The optional parts, looked for at C speed (most submits have none).
        groups = set(map(_GROUP, new))
        groups.discard(None)
        for name in groups.difference(self.groups):
            self._group(name)
        self.store.insert_tasks(rows, [(it[0], it[2]) for it in new])
        plan.count("submitted", len(rows))
        if any(map(_TAGS, new)):
            self.store.add_tags([(it[0], k, v) for it in new if it[13] for k, v in it[13]])
        if any(map(_DEPS, new)):
            held = self._hold_dependents(plan, new)
            rows = [r for r in rows if r[0] not in held]
        ahead, spill = self._hold_back(_live(rows))
        top = self.spill_top
        if top is not None:  # gate 0 keeps every spilled task behind the segment's
            behind = [r for r in ahead if not _live_rank(r) < top and not self._gate(r)]
            if behind:
                spill.extend(map(self._spill_row, behind))
                out = {r[0] for r in behind}
                ahead = [r for r in ahead if r[0] not in out]
        free = max(0, self.seg.raw_info().nfree - plan.placing())  # placed after the commit
        if len(ahead) > free:
            ahead.sort(key=_live_rank)
            spill.extend(map(self._spill_row, ahead[free:]))
            ahead = ahead[:free]
            plan.swap = True  # some may outrank what the segment holds
        plan.place.extend(ahead)
        if spill:
            self._spill(spill)

    def _hold_dependents(self, plan: "_Plan", new: List[protocol.Item]) -> set:
        """Tasks that depend on others wait (in the waiting table, not the
        segment) until every dependency completed; one whose dependency
        already ended dead or cancelled is cancelled now.  Returns their ids."""
        parents = sorted({p for it in new if it[12] for p in it[12]})
        stored = self.store.last_states(parents)
        fresh = {it[0] for it in new}  # submitted in this same turn: live
        held = set()
        for it in new:
            if not it[12]:
                continue
            tid = it[0]
            held.add(tid)
            states = [stored.get(p, 0) if p not in fresh else 0 for p in it[12]]
            if any(st in (shm.DEAD, shm.CANCELLED) for st in states):
                self._cancel_waiting(plan, [tid])
                continue
            # A parent missing here was purged after it ended; it cannot hold anyone back.
            open_ = [p for p, st in zip(it[12], states) if st != shm.COMPLETED and (p in stored or p in fresh)]
            if open_:
                self.store.wait_for(tid, open_)
                self.waiting_n += 1
            else:
                plan.ready_children.append(tid)
        return held

    def _cancel_waiting(self, plan: "_Plan", ids: List[int]) -> None:
        """Cancel tasks that wait (or were about to), and everything that waits on them."""
        at = now_us()
        while ids:
            self.store.record_outcomes([(tid, 0, shm.CANCELLED, at, None) for tid in ids])
            plan.count("cancelled", len(ids))
            ids = self.store.waiting_children(ids) if self.waiting_n else []
            self.waiting_n = max(0, self.waiting_n - len(ids))

    def _group(self, name: str, limit: Optional[int] = None) -> int:
        """The index of group `name`, given one (in this transaction) if it is new."""
        idx, old = self.groups.get(name, (0, 0))
        if not idx:
            idx = max((i for i, _ in self.groups.values()), default=0) + 1
            if idx >= shm.MAX_GROUPS:
                raise errors.InvalidArgument(f"too many groups: {shm.MAX_GROUPS - 1} names are in use")
        if limit is None:
            limit = old
        if (idx, limit) != self.groups.get(name):
            self.store.put_group(name, idx, limit)
            self.groups[name] = (idx, limit)
        return idx

    def _apply_group_limits(self, seg: Segment) -> None:
        for idx, limit in self.groups.values():
            seg.set_group_limit(idx, limit)

    def _defined(self, it: protocol.Item, seq: int) -> TaskRow:
        """The row of an item whose submitter did not know its definition:
        limits it left unset come from the registered definition (0 where
        none is registered yet: the claiming worker's definition applies)."""
        max_attempts, timeout_ms, backoff = self.defs.get(it[1], (0, 0, 0))
        return (it[0], it[1], it[4], seq, it[9], it[6], it[5], it[8], it[7] or max_attempts, it[3],
                timeout_ms, backoff)

    def _spill(self, rows: List[SpillRow]) -> None:
        self.store.spill_add(rows)
        self.spill_n += len(rows)
        for r in rows:
            if r[3]:
                self.gate_n[r[3]] = self.gate_n.get(r[3], 0) + 1
            elif self.spill_top is None or _rank(r[0], r[1]) < self.spill_top:
                self.spill_top = _rank(r[0], r[1])

    def _write_dirty(self, plan: "_Plan", n: int) -> None:
        at = now_us()
        # (id, attempt, state) of each peeked slot, unpacked in C.
        # A delayed task's outcome keeps its run-at, so a restart honours the
        # backoff; a dead one the attempt limit it reached.
        rows = [(tid, attempt, state, at, run_at if state == shm.DELAYED else limit if state == shm.DEAD else None)
                for tid, run_at, attempt, limit, state
                in _DIRTY.iter_unpack(shm.ffi.buffer(self.dirty_buf, n * _DIRTY.size))]
        states = collections.Counter(r[2] for r in rows)
        done = {name: states[st] for st, name in _TERMINAL_NAMES.items() if states[st]}
        self.store.record_outcomes(rows)
        # In the same transaction: a flushed slot is freed right after the
        # commit, and stats must not see it leave before the total grows.
        self.store.bump(done)
        if self.waiting_n:  # dependents of what just ended
            completed = [r[0] for r in rows if r[2] == shm.COMPLETED]
            if completed:
                ready = self.store.parents_done(completed)
                self.waiting_n -= len(ready)
                plan.ready_children.extend(ready)
            failed = [r[0] for r in rows if r[2] in (shm.DEAD, shm.CANCELLED)]
            if failed:
                children = self.store.waiting_children(failed)
                self.waiting_n -= len(children)
                self._cancel_waiting(plan, children)

    def _check_agreement(self) -> int:
        """The database and the segment agree: every live task is in the
        segment or the spill store (not both, not neither), every slot holds
        a stored task, and a slot with no unflushed change is live exactly
        when its task is live on disk.  Raises StoreCorrupt naming the first
        disagreement (SegmentCorrupt for a broken segment); returns the
        number of tasks checked."""
        seg, store = self.seg, self.store
        seg.verify()
        check = store.quick_check()
        if check != "ok":
            raise errors.StoreCorrupt(f"database {self.db} fails quick_check: {check}")
        slots = {}
        for i in range(seg.capacity):
            s = seg.read_slot(i)
            if s.state != shm.FREE:
                slots[s.id] = s
        live = {r[0] for r in store.live()}
        spilled = store.spill_ids()
        waiting = set(store.waiting_ids())
        stored = store.last_states(list(slots))

        def fail(what: str) -> None:
            raise errors.StoreCorrupt(f"database {self.db} and its segment disagree: {what}")
        if len(spilled) != len(set(spilled)):
            fail("a task is spilled twice")
        for tid in spilled:
            if tid in slots:
                fail(f"task {tid} is both in the segment and in the spill store")
            if tid not in live:
                fail(f"spilled task {tid} is not live on disk")
        for tid, s in slots.items():
            if tid not in stored:
                fail(f"slot {s.slot} holds task {tid}, which is not in the database")
            if tid in waiting:
                fail(f"task {tid} waits for its dependencies but is in the segment")
            if not s.dirty and (s.state not in shm.TERMINAL) != (tid in live):
                fail(f"task {tid} is {shm.STATE_NAMES[s.state]} in slot {s.slot} (no unflushed change) "
                     f"but {'live' if tid in live else 'ended'} on disk")
        lost = live.difference(slots, spilled)
        if lost:
            fail(f"{len(lost)} live tasks are neither in the segment nor spilled (e.g. {min(lost)})")
        return len(live) + len(waiting)

    # ---- spill and refill -------------------------------------------------------------

    def write_totals(self) -> None:
        """Add the committed totals to the counters table (kept for the next pass if the disk refuses)."""
        if self.totals:
            try:
                with self.store.transaction():
                    self.store.bump(self.totals)
            except apsw.Error as e:
                self.store_failed(e)
                return
            self.totals = {}

    def rebalance(self) -> None:
        """Keep every spilled task of gate 0 ranked below every pending one in
        the segment (swapping when a spilled one outranks the segment's
        worst), and refill the segment from the spill store as it drains."""
        if self.unspilled:  # refused by the disk last time
            rows, self.unspilled = self.unspilled, []
            if not self._spill_now(rows):
                return
        if not self.spill_n:
            return
        seg = self.seg
        info = seg.info()
        cap, free = info["capacity"], info["free"]
        if self.limited:
            free += self._shed_parked()
        if any(self.gate_n.values()):
            free = self._refill_gates(free)
        # Pending tasks that are all parked (their groups are full) cannot run: refill.
        refill = free >= cap * self.cfg.refill_free or seg.peek_worst() is None
        if not refill:
            # spill_top is never below the best spilled task: if it does not
            # outrank the segment's worst, no swap is due (the usual case with
            # a backlog, checked without reading the spill store).
            w = seg.peek_worst()
            if self.spill_top is None or w is None or not self.spill_top < _rank(w.prio, w.seq):
                return
        tops = self.store.spill_ranks(SWAP_MAX)
        take = 0
        if refill:
            take = min(len(tops), free, max(1, self._fill_target(cap) - (cap - free)))
        free -= take
        evicted: List[SpillRow] = []
        for r in tops[take:]:
            w = seg.peek_worst()
            if w is None or not _rank(*r) < _rank(w.prio, w.seq):
                break
            if free > 0:
                free -= 1
            else:
                try:
                    e = seg.evict_worst()
                except errors.SlotBusy:
                    break  # its change must reach disk first; the next pass tries again
                if e is None:
                    break
                evicted.append((e.prio, e.seq, e.id, e.group if e.group in self.limited else 0))
            take += 1
        if not take:
            return
        try:
            with self.store.transaction():
                if evicted:
                    self._spill(evicted)
                rows = self.store.spill_take(take)
                self.spill_n -= len(rows)
                self._read_spill_top()
        except apsw.Error as e:
            self._spill_refused(e, evicted)
            return
        self._place_or_spill([r for r in rows if seg.get(r[0]) is None])

    def _shed_parked(self) -> int:
        """Spill the parked tasks of limited groups that hold more than their
        quota (their limit was set, or more groups were limited, after they
        filled the segment); returns how many slots that freed."""
        seg = self.seg
        out: List[SpillRow] = []
        for gate in self.limited:
            g = seg.group_info(gate)
            for _ in range(min(g["parked"], g["members"] - self._quota(gate, seg.capacity))):
                try:
                    e = seg.evict_parked(gate)
                except errors.SlotBusy:
                    break  # its change must reach disk first; the next pass tries again
                if e is None:
                    break
                out.append((e.prio, e.seq, e.id, gate))
        if out:
            self._spill_now(out)
        return len(out)

    def _refill_gates(self, free: int) -> int:
        """Move the backlog of limited groups that ran down below half their
        quota into the segment; returns the slots left free."""
        seg = self.seg
        for gate, n in list(self.gate_n.items()):
            if not n or free <= 0 or gate not in self.limited:
                continue
            quota = self._quota(gate, seg.capacity)
            members = seg.group_info(gate)["members"]
            room = quota - members
            if room <= 0 or (members > self.limited[gate] and room < (quota - self.limited[gate]) // 2):
                continue  # enough of it waits in the segment; move a bigger batch later
            try:
                with self.store.transaction():
                    rows = self.store.spill_take(min(room, n, free), gate)
            except apsw.Error as e:
                self.store_failed(e)
                break
            self.gate_n[gate] -= len(rows)
            self.spill_n -= len(rows)
            free -= len(rows)
            self._place_or_spill([r for r in rows if seg.get(r[0]) is None], held=True)
        return free

    # ---- lifecycle ---------------------------------------------------------------------

    def no_clients(self) -> bool:
        if paths.try_flock(self.clients_fd, exclusive=True):
            return True
        return False

    def run(self) -> int:
        cfg = self.cfg
        seg = self.seg
        idle_since: Optional[float] = None
        while True:
            seen = seg.event(shm.EV_WRITER)
            busy = self.turn()
            self.upkeep.maybe_run()
            if self.stop:
                break
            if busy:
                idle_since = None
                if self.more or self.stream_head is not None:
                    continue
                # Nothing was left behind: wait, which returns at once if
                # anything arrived since `seen` (a new request notifies).
            elif self.upkeep.due_exit_check():
                if self.no_clients():
                    if idle_since is None:
                        idle_since = time.monotonic()
                    fcntl.flock(self.clients_fd, fcntl.LOCK_UN)
                    if time.monotonic() - idle_since >= cfg.idle_exit:
                        # Hold the clients lock: a new client waits for us to
                        # finish, then starts a fresh writer.
                        if paths.try_flock(self.clients_fd, exclusive=True):
                            break
                else:
                    idle_since = None
            if self.waited:  # the C turn loop waited for requests already
                self.waited = False
                continue
            info = seg.raw_info()
            # Idle, it still looks every flush interval: a change that a worker
            # reported (which wakes nobody, to keep its path free of system
            # calls) reaches disk within about one interval.
            timeout = cfg.flush_interval
            if info.ring_size:  # reported outcomes wait for the next flush, due then
                timeout = min(timeout, max(0.0, self.last_flush + cfg.flush_interval - time.monotonic()))
            if info.next_run_at:  # a delayed task (a retry's backoff) comes due at its time, not a pass later
                wait_us = info.next_run_at - now_us()
                if wait_us <= 0:
                    seg.promote(now_us())
                    continue
                timeout = min(timeout, wait_us / 1e6)
            seg.wait(shm.EV_WRITER, seen, timeout)
        self.shutdown()
        return EXIT_OK

    def shutdown(self) -> None:
        """Write everything outstanding, mark the database clean, checkpoint."""
        for _ in range(1000):
            if not self.turn(force_flush=True):
                break
        with self.store.transaction():
            self.store.bump(self.totals)
            self.totals = {}
            self.store.meta_set("clean", 1)
        if self.wal_sync is not None:
            self.wal_sync.close()
        try:
            self.store.checkpoint(truncate=True)
        except apsw.Error:
            pass
        self.store.close()
        # Nothing in the segment is needed any more (the database holds it
        # all), and a segment left behind would outlive a deleted database.
        Segment.unlink(self.name)
        self.seg.close()


class _StreamStopped(Exception):
    """The writer stops working ahead on a streamed request (see _stream_turn)."""


class _Plan:
    """What one turn will write and then do."""

    __slots__ = ("new", "keys", "place", "packed", "answers", "cancel_live", "swap", "counts", "revive", "limits",
                 "ready_children", "requests")

    def __init__(self) -> None:
        self.new: List[Any] = []
        self.keys: Dict[bytes, int] = {}
        self.place: List[Any] = []
        #: Rows to place, already packed as hr_task arrays: (rows, array).
        self.packed: List[Tuple[List[Any], Any]] = []
        self.answers: List[Tuple[Any, bytes]] = []
        self.cancel_live: List[int] = []
        self.swap = False
        self.counts: Dict[str, int] = {}
        self.revive: List[Any] = []
        self.limits: List[Tuple[int, int]] = []
        self.ready_children: List[int] = []
        #: (ids inserted, time) per submit request, for the event stream.
        self.requests: List[Tuple[List[int], int]] = []

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def placing(self) -> int:
        """Rows this turn places after its commit."""
        return len(self.place) + sum(len(rows) for rows, _ in self.packed)


def take_lock(db: str) -> int:
    """The writer lock of `db`, held until the returned fd is closed (or we die)."""
    fd = paths.open_private(paths.lock_path(db), strict=True)
    if not paths.try_flock(fd, exclusive=True):
        os.close(fd)
        raise errors.WriterUnavailable("another writer holds the lock")
    return fd


def _daemonize() -> int:
    """Detach (double fork).  Returns the fd on which the daemon reports how
    its start went: the intermediate process, which the starting process
    waits for, exits with that code (or EXIT_FAILED if the daemon died
    first), so a writer that cannot start is an error there, not a wait."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        code = os.read(r, 1)  # until the daemon reports, or dies (EOF)
        os._exit(code[0] if code else EXIT_FAILED)
    os.close(r)
    os.setsid()
    return w


def _started(fd: int, code: int) -> int:
    """Report the start-up outcome `code` on `fd` (see :func:`_daemonize`); returns it."""
    if fd >= 0:
        try:
            os.write(fd, bytes([code]))
        except OSError:
            pass  # the starting process is gone; nobody waits
        finally:
            os.close(fd)
    return code


def _store_failure(e: errors.StoreError) -> int:
    print(f"headrace writer: {e}", file=sys.stderr)
    return paths.exit_code(e)


def _remove_stale_segments() -> None:
    """Remove the segments that killed writers left of databases now gone
    (each holds memory until a reboot); say so in the writer's log."""
    try:
        for path, why in paths.stale_segments(remove=True):
            print(f"headrace writer: removed segment {path}: {why}", file=sys.stderr)
    except OSError as e:  # never a reason not to serve
        print(f"headrace writer: could not look for stale segments: {e}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.writer")
    ap.add_argument("db")
    ap.add_argument("--daemon", action="store_true", help="detach (fork) before running")
    ap.add_argument("--sync", default="normal")
    ap.add_argument("--settings", default="{}", help="JSON of engine.config settings")
    a = ap.parse_args(argv)
    cfg = config.settings(**json.loads(a.settings))
    db = os.path.abspath(a.db)
    try:
        lock_fd = take_lock(db)  # the forked daemon inherits it
    except errors.WriterUnavailable:
        return EXIT_LOCKED
    except errors.StoreError as e:
        return _store_failure(e)
    # Fail here, where the starting process sees the exit code, on a
    # database that cannot be opened; then detach.
    try:
        paths.check_sqlite_files(db)
        SQLiteStore(db, a.sync).close()
    except errors.StoreError as e:
        return _store_failure(e)
    ready = _daemonize() if a.daemon else -1
    try:
        w = Writer(db, cfg, a.sync, lock_fd)
    except Exception as e:
        if isinstance(e, errors.StoreError):
            code = _store_failure(e)
        elif isinstance(e, apsw.Error):  # a damaged page met while reading the live set, say
            code = _store_failure(store_error(db, e, "cannot read database"))
        else:
            traceback.print_exc()
            code = EXIT_FAILED
        os.close(lock_fd)  # free before the starting process hears of it: no writer is left when it raises
        return _started(ready, code)

    def on_signal(signum: int, frame: Any) -> None:
        w.stop = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _started(ready, EXIT_OK)
    _remove_stale_segments()
    prof_path = os.environ.get("HEADRACE_WRITER_PROFILE")  # a developer's aid: cProfile stats file
    prof = None
    if prof_path:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    try:
        return w.run()
    except Exception:
        traceback.print_exc()
        return EXIT_FAILED
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(prof_path)


if __name__ == "__main__":
    sys.exit(main())
