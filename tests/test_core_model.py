"""Stateful property test: the C structures against a pure-Python model.

Hypothesis drives random interleavings of every segment operation on a
small segment (so that "full" happens often).  After every step the C-side
``verify()`` must pass and every observable answer must match the model:
sortedcontainers for the heaps, a dict for the dedup set, a deque for the ring.
"""
from __future__ import annotations

import itertools
import os
from collections import deque
from typing import Dict, List, Optional, Tuple

import hypothesis.strategies as st
import pytest
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sortedcontainers import SortedList

from engine import errors
from engine.shm import (BO_CONSTANT, BO_EXPONENTIAL, BO_LINEAR, BO_NONE, CANCELLED, COMPLETED, DEAD, DELAYED,
                        PENDING, RUNNING, STATE_NAMES, TERMINAL, TIMED_OUT, WAITING, Segment, Ticket, fill_task,
                        ffi, pack_backoff)

from helpers import model_settings

CAP = 12
KEYS = [(k * 7919 + 1, k * 104729 + 3) for k in range(6)]  # a small pool, so collisions happen
#: Retry policies without jitter, so the model can predict every delay:
#: (kind, base ms, cap ms) -> delay in us after failed attempt n.
POLICIES = [(BO_NONE, 0, 0), (BO_CONSTANT, 1, 0), (BO_LINEAR, 1, 2), (BO_EXPONENTIAL, 1, 3)]
GROUPS = [0, 1, 1, 2]


def model_backoff_us(kind: int, base: int, cap: int, n: int) -> int:
    d = {BO_NONE: 0, BO_CONSTANT: base, BO_LINEAR: base * n, BO_EXPONENTIAL: base * 2 ** (n - 1)}[kind]
    return (min(d, cap) if cap else d) * 1000
_names = itertools.count()


class Task:
    def __init__(self, id: int, slot: int, prio: int, seq: int, state: int, run_at: int,
                 dedup: Optional[Tuple[int, int]], attempt: int) -> None:
        self.id, self.slot, self.prio, self.seq, self.state = id, slot, prio, seq, state
        self.run_at, self.dedup, self.attempt = run_at, dedup, attempt
        self.lease = 0
        self.deadline = 0
        self.max_attempts = 0
        self.timeout_ms = 0
        self.policy = POLICIES[0]
        self.group = 0
        self.version = 1
        self.dirty = False

    def rkey(self) -> Tuple[int, int]:
        return (255 - self.prio, self.seq)


class SegmentModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.seg = Segment.create(f"model-{os.getpid()}-{next(_names)}", CAP)
        self.ids = itertools.count(1)
        self.seq = 0
        self.clock = 1_000_000
        self.tasks: Dict[int, Task] = {}          # live slots (not yet freed), by id
        self.ready: SortedList = SortedList()     # (255 - prio, seq, id)
        self.dedup: Dict[Tuple[int, int], int] = {}
        self.ring: deque = deque()                # [id, seen-version]
        self.tickets: List[Ticket] = []           # every ticket ever handed out
        self.gone: List[int] = []                 # ids that were freed
        self.epoch: Optional[int] = None
        self.peeked = 0
        self.limits: Dict[int, int] = {1: 0, 2: 0}  # group -> concurrency limit (0: none)
        # Pending tasks of a full group wait here, not in `ready` (group.h).
        self.parked: Dict[int, SortedList] = {1: SortedList(), 2: SortedList()}

    def teardown(self) -> None:
        path = self.seg.path
        self.seg.close()
        os.unlink(path)

    # ---- model helpers -------------------------------------------------------

    def _touch(self, t: Task) -> None:
        t.version += 1
        if not t.dirty:
            t.dirty = True
            self.ring.append([t.id, 0])

    def _set_state(self, t: Task, state: int) -> None:
        if t.state == PENDING:
            entry = (*t.rkey(), t.id)
            if t.group and entry in self.parked[t.group]:
                self.parked[t.group].remove(entry)
            else:
                self.ready.remove(entry)
        if t.state not in TERMINAL and state in TERMINAL and t.dedup is not None:
            del self.dedup[t.dedup]
        t.state = state
        if state == PENDING:
            self._link(t)

    def _running(self, g: int) -> int:
        return sum(1 for t in self.tasks.values() if t.state == RUNNING and t.group == g)

    def _full(self, g: int) -> bool:
        return bool(g and self.limits[g] and self._running(g) >= self.limits[g])

    def _link(self, t: Task) -> None:
        """A pending task goes to the ready heap, or is parked while its group is full."""
        (self.parked[t.group] if self._full(t.group) else self.ready).add((*t.rkey(), t.id))

    def _freed(self, g: int) -> None:
        """A task of g stopped running (or left the heap, or its limit rose):
        its best parked tasks go back to the heap, as many as it has room for."""
        if not g:
            return
        room = max(0, self.limits[g] - self._running(g)) if self.limits[g] else len(self.parked[g])
        for _ in range(min(room, len(self.parked[g]))):
            self.ready.add(self.parked[g].pop(0))

    def _free(self, t: Task) -> None:
        del self.tasks[t.id]
        self.gone.append(t.id)

    def _expected_insert(self, id: int, dedup: Optional[Tuple[int, int]]) -> str:
        if dedup is not None and dedup in self.dedup:
            return "dup"
        if len(self.tasks) >= CAP:
            return "full"
        return "ok"

    # ---- rules -----------------------------------------------------------------

    @rule(data=st.data(), n=st.integers(1, 5))
    def push_batch(self, data: st.DataObject, n: int) -> None:
        arr = self.seg.tasks(n)
        specs = []
        for k in range(n):
            id = next(self.ids)
            prio = data.draw(st.sampled_from([0, 1, 7, 255]))
            state = data.draw(st.sampled_from([PENDING, PENDING, DELAYED, WAITING]))
            run_at = self.clock + data.draw(st.integers(0, 50))
            dedup = data.draw(st.none() | st.sampled_from(KEYS))
            limits = (data.draw(st.sampled_from([0, 1, 2, 3])), data.draw(st.sampled_from([0, 0, 1, 3])),
                      data.draw(st.sampled_from(POLICIES)), data.draw(st.sampled_from(GROUPS)))
            fill_task(arr[k], id, prio=prio, state=state, run_at=run_at, dedup=dedup, max_attempts=limits[0],
                      timeout_ms=limits[1], backoff=pack_backoff(*limits[2]), group=limits[3])
            specs.append((id, prio, state, run_at, dedup, limits))
        out, inserted = self.seg.push_batch(arr, n)
        ok = 0
        for k, (id, prio, state, run_at, dedup, limits) in enumerate(specs):
            want = self._expected_insert(id, dedup)
            rc = out[k]
            if want == "dup":
                assert rc == -2, (k, rc)
            elif want == "full":
                assert rc == -1, (k, rc)
            else:
                assert rc >= 0, (k, rc)
                self.seq += 1
                t = Task(id, rc, prio, self.seq, state, run_at, dedup, 0)
                t.max_attempts, t.timeout_ms, t.policy, t.group = limits
                self.tasks[id] = t
                if dedup is not None:
                    self.dedup[dedup] = id
                if state == PENDING:
                    self._link(t)
                ok += 1
        assert inserted == ok

    @rule(max=st.integers(1, 6), lease=st.integers(1, 40), start=st.booleans())
    def claim(self, max: int, lease: int, start: bool) -> None:
        out, n = self.seg.pop_batch(max, self.clock + lease, now=self.clock, start=start)
        # The best pending tasks whose group is below its limit, counting the
        # ones this claim takes; a popped task of a full group is parked.
        want = []
        while len(want) < max and self.ready:
            entry = self.ready[0]
            t = self.tasks[entry[2]]
            if self._full(t.group):
                self.ready.remove(entry)
                self.parked[t.group].add(entry)
                continue
            want.append(entry)
            self._set_state(t, RUNNING)
        assert n == len(want), ([out[k].id for k in range(n)], want)
        for k, (_, _, id) in enumerate(want):
            t = self.tasks[id]
            assert (out[k].id, out[k].slot) == (id, t.slot)
            t.attempt += 1
            t.deadline = self.clock + t.timeout_ms * 1000 if t.timeout_ms and start else 0
            t.lease = min(self.clock + lease, t.deadline) if t.deadline else self.clock + lease
            assert out[k].attempt == t.attempt
            self._touch(t)
            self.tickets.append(Ticket(id, t.slot, t.attempt))

    def _live_ticket(self, tk: Ticket) -> Optional[Task]:
        t = self.tasks.get(tk.id)
        if t is None or t.state != RUNNING or t.attempt != tk.attempt or t.slot != tk.slot:
            return None
        return t

    @precondition(lambda self: self.tickets)
    @rule(data=st.data(), state=st.sampled_from([COMPLETED, DEAD, CANCELLED, PENDING, DELAYED]))
    def finish(self, data: st.DataObject, state: int) -> None:
        picks = data.draw(st.lists(st.sampled_from(self.tickets), min_size=1, max_size=4))
        arr = self.seg.tickets(len(picks))
        for k, tk in enumerate(picks):
            arr[k].id, arr[k].slot, arr[k].attempt = tk
        run_at = self.clock + 5
        out, ok = self.seg.finish_batch(arr, len(picks), state, run_at=run_at, aux=9)
        applied = 0
        for k, tk in enumerate(picks):
            t = self._live_ticket(tk)
            if t is None:
                assert out[k] == -4  # fenced
                continue
            assert out[k] == 0
            applied += 1
            if state == DELAYED:
                t.run_at = run_at
            self._set_state(t, state)
            self._freed(t.group)
            self._touch(t)
        assert ok == applied

    @precondition(lambda self: self.tickets)
    @rule(data=st.data(), extra=st.integers(1, 60))
    def heartbeat(self, data: st.DataObject, extra: int) -> None:
        tk = data.draw(st.sampled_from(self.tickets))
        t = self._live_ticket(tk)
        assert self.seg.heartbeat(tk, self.clock + extra) == (t is not None)
        if t is not None:  # never past the deadline
            t.lease = min(self.clock + extra, t.deadline) if t.deadline else self.clock + extra

    @precondition(lambda self: self.tickets)
    @rule(data=st.data(), start=st.booleans(), extra=st.integers(1, 60))
    def clock_(self, data: st.DataObject, start: bool, extra: int) -> None:
        tk = data.draw(st.sampled_from(self.tickets))
        t = self._live_ticket(tk)
        assert self.seg.clock(tk, start, self.clock + extra, now=self.clock) == (t is not None)
        if t is not None:
            t.deadline = self.clock + t.timeout_ms * 1000 if start and t.timeout_ms else 0
            t.lease = min(self.clock + extra, t.deadline) if t.deadline else self.clock + extra

    def _after_failure(self, t: Task, retry: bool, delay_us: int) -> int:
        """The model of where a failed attempt goes."""
        if not retry or (t.max_attempts and t.attempt >= t.max_attempts):
            return DEAD
        if delay_us < 0:
            delay_us = model_backoff_us(*t.policy, t.attempt)
        if delay_us <= 0:
            return PENDING
        t.run_at = self.clock + delay_us
        return DELAYED

    @precondition(lambda self: self.tickets)
    @rule(data=st.data(), retry=st.booleans(), delay=st.sampled_from([-1, -1, 0, 2000]))
    def fail(self, data: st.DataObject, retry: bool, delay: int) -> None:
        tk = data.draw(st.sampled_from(self.tickets))
        t = self._live_ticket(tk)
        got = self.seg.fail(tk, retry=retry, delay_us=delay, now=self.clock)
        if t is None:
            assert got is None
            return
        want = self._after_failure(t, retry, delay)
        assert got == want
        if want == DELAYED:
            assert self.seg.get(t.id).run_at == t.run_at
        t.lease = t.deadline = 0
        self._set_state(t, want)
        self._freed(t.group)
        self._touch(t)

    @initialize(l1=st.sampled_from([1, 1, 2, 0]), l2=st.sampled_from([1, 2, 0]))
    def limit_groups(self, l1: int, l2: int) -> None:
        self.set_group_limit(1, l1)
        self.set_group_limit(2, l2)

    @rule(group=st.sampled_from([1, 2]), limit=st.sampled_from([0, 1, 2]))
    def set_group_limit(self, group: int, limit: int) -> None:
        self.seg.set_group_limit(group, limit)
        self.limits[group] = limit
        self._freed(group)
        info = self.seg.group_info(group)
        assert info["limit"] == limit
        assert (info["running"], info["parked"]) == (self._running(group), len(self.parked[group]))

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        pool = list(self.tasks) + self.gone[-3:] + [10**9]
        id = data.draw(st.sampled_from(pool))
        t = self.tasks.get(id)
        if t is None:
            with pytest.raises(errors.TaskNotFound):
                self.seg.remove(id)
        elif t.state in TERMINAL:
            with pytest.raises(errors.InvalidState):
                self.seg.remove(id)
        else:
            assert self.seg.remove(id) == t.slot
            self._set_state(t, CANCELLED)
            self._freed(t.group)
            self._touch(t)

    @rule(dt=st.integers(0, 30) | st.integers(500, 4000))
    def tick_expire_promote(self, dt: int) -> None:
        self.clock += dt
        states = ffi.new("uint8_t[]", CAP)
        out, n = self.seg.expire(self.clock, max=CAP, states=states)
        want = sorted(t.id for t in self.tasks.values() if t.state == RUNNING and t.lease <= self.clock)
        got = [out[k].id for k in range(n)]
        assert sorted(got) == want
        for k, id in enumerate(got):  # equal leases expire in heap order; the ring follows it
            t = self.tasks[id]
            timed_out = bool(t.deadline) and self.clock >= t.deadline
            # A lease that ran out hands the task back at once; a deadline
            # that passed is a failed attempt, with its backoff.
            new = self._after_failure(t, True, -1 if timed_out else 0)
            assert states[k] == new | (TIMED_OUT if timed_out else 0), (id, states[k], new, timed_out)
            t.lease = t.deadline = 0
            self._set_state(t, new)
            self._freed(t.group)
            self._touch(t)
        promoted = self.seg.promote(self.clock)
        due = [t for t in self.tasks.values() if t.state == DELAYED and t.run_at <= self.clock]
        assert promoted == len(due)
        for t in due:
            self._set_state(t, PENDING)  # not a durable change: no touch

    @rule()
    def peek_best_worst(self) -> None:
        best, worst = self.seg.peek_best(), self.seg.peek_worst()
        if not self.ready:
            assert best is None and worst is None
        else:
            assert best is not None and worst is not None
            assert best.id == self.ready[0][2]
            assert worst.id == self.ready[-1][2]

    @rule()
    def evict_worst(self) -> None:
        if not self.ready:
            assert self.seg.evict_worst() is None
            return
        t = self.tasks[self.ready[-1][2]]
        if t.dirty:
            with pytest.raises(errors.SlotBusy):
                self.seg.evict_worst()
            return
        got = self.seg.evict_worst()
        assert got is not None and got.id == t.id and got.seq == t.seq and got.prio == t.prio
        self.ready.remove((*t.rkey(), t.id))
        if t.dedup is not None:
            del self.dedup[t.dedup]
        self._free(t)
        self._freed(t.group)

    @rule(group=st.sampled_from([1, 2]))
    def evict_parked(self, group: int) -> None:
        parked = self.parked[group]
        if not parked:
            assert self.seg.evict_parked(group) is None
            return
        t = self.tasks[parked[-1][2]]
        if t.dirty:
            with pytest.raises(errors.SlotBusy):
                self.seg.evict_parked(group)
            return
        got = self.seg.evict_parked(group)
        assert got is not None and got.id == t.id and got.group == group
        parked.remove((*t.rkey(), t.id))
        if t.dedup is not None:
            del self.dedup[t.dedup]
        self._free(t)

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def mark_dirty(self, data: st.DataObject) -> None:
        t = self.tasks[data.draw(st.sampled_from(sorted(self.tasks)))]
        self.seg.mark_dirty(t.slot)
        self._touch(t)

    @rule(max=st.integers(1, CAP))
    def peek_dirty(self, max: int) -> None:
        recs, n, epoch = self.seg.peek_dirty(max)
        assert n == min(max, len(self.ring))
        for k in range(n):
            entry = self.ring[k]
            t = self.tasks[entry[0]]
            assert recs[k].slot == t.slot and recs[k].rec.id == t.id
            assert recs[k].rec.state == t.state and recs[k].rec.attempt == t.attempt
            entry[1] = t.version
        self.epoch, self.peeked = epoch, n

    @precondition(lambda self: self.epoch is not None)
    @rule(data=st.data())
    def advance_dirty(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, self.peeked))
        freed = self.seg.advance_dirty(n, self.epoch)
        want_freed = 0
        for _ in range(n):
            id, seen = self.ring.popleft()
            t = self.tasks[id]
            if t.version != seen:
                self.ring.append([id, 0])
                continue
            t.dirty = False
            if t.state in TERMINAL:
                self._free(t)
                want_freed += 1
        assert freed == want_freed
        self.epoch, self.peeked = None, 0
        for entry in self.ring:
            entry[1] = 0

    @rule(key=st.sampled_from(KEYS), data=st.data())
    def dedup_ops(self, key: Tuple[int, int], data: st.DataObject) -> None:
        holder = self.dedup.get(key)
        got = self.seg.dedup_lookup(key)
        assert got == (None if holder is None else self.tasks[holder].slot)
        op = data.draw(st.sampled_from(["insert", "delete"]))
        if op == "delete":
            assert self.seg.dedup_delete(key) == (holder is not None)
            if holder is not None:
                del self.dedup[key]
                self.tasks[holder].dedup = None
            return
        keyless = sorted(id for id, t in self.tasks.items() if t.dedup is None and t.state not in TERMINAL)
        if not keyless:
            return
        t = self.tasks[data.draw(st.sampled_from(keyless))]
        if holder is not None:
            with pytest.raises(errors.DuplicateTask):
                self.seg.dedup_insert(key, t.slot)
        else:
            self.seg.dedup_insert(key, t.slot)
            self.dedup[key] = t.id
            t.dedup = key

    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        id = data.draw(st.sampled_from(list(self.tasks) + self.gone[-3:] + [10**9]))
        info = self.seg.get(id)
        t = self.tasks.get(id)
        if t is None:
            assert info is None
        else:
            assert info is not None
            assert (info.slot, info.state, info.prio, info.attempt, info.dirty, info.dedup) == (
                t.slot, t.state, t.prio, t.attempt, t.dirty, t.dedup), STATE_NAMES[t.state]

    @invariant()
    def structures_agree(self) -> None:
        self.seg.verify()
        info = self.seg.info()
        assert info["free"] == CAP - len(self.tasks)
        assert info["ring"] == len(self.ring)
        for code, name in enumerate(STATE_NAMES[1:], start=1):
            assert info["counts"][name] == sum(1 for t in self.tasks.values() if t.state == code), name
        assert self.seg.pending_count() == info["counts"]["pending"]  # the lock-free read, at rest
        for g in self.limits:
            assert self.seg.group_info(g)["members"] == sum(1 for t in self.tasks.values() if t.group == g)


TestSegmentModel = SegmentModel.TestCase
TestSegmentModel.settings = model_settings(500, 150, 60)
