"""A lock holder killed by SIGKILL in the middle of every locked operation.

Each child process arms a fault site (``HEADRACE_FAULT=site:hit``) and dies
while holding the robust mutex, after it journaled a slot and half-changed
it.  The next locker gets EOWNERDEAD, repairs, and must find every invariant
true (C-side ``verify``) and every task exactly as before the interrupted
operation: the slot write is rolled back and nothing is lost.
"""
from __future__ import annotations

import json
import signal
from typing import Dict, List, Tuple

import pytest

from engine import faults
from engine.shm import DELAYED, Segment, fill_task, key_hash, now_us

from helpers import spawn

KEY = key_hash("q", "dedup-me")
FAR = 3_600_000_000  # an hour, in microseconds


def snapshot(seg: Segment, ids: List[int]) -> Dict[int, Tuple]:
    out = {}
    for id in ids:
        s = seg.get(id)
        out[id] = None if s is None else (s.slot, s.state, s.prio, s.seq, s.attempt, s.dirty, s.dedup,
                                          s.run_at, s.lease_until)
    return out


def populate(seg: Segment) -> Tuple[List[int], List[Tuple[int, int, int]]]:
    """Pending, delayed-and-due, keyed and running tasks; returns (ids, running tickets)."""
    arr = seg.tasks(20)
    for k in range(20):
        id = k + 1
        state = DELAYED if k in (3, 4) else 1
        fill_task(arr[k], id, prio=k % 4, state=state, run_at=now_us() - 1_000_000,
                  dedup=KEY if id == 10 else None)
    seg.push_batch(arr)
    # Two running tasks with a lease in the past (for expire) and two live.
    expired, _ = seg.pop_batch(2, now_us() - 1)
    held, _ = seg.pop_batch(2, now_us() + FAR)
    tickets = [(t.id, t.slot, t.attempt) for t in (expired[0], expired[1], held[0], held[1])]
    # Flush everything once so that evict finds a clean worst entry.
    recs, n, epoch = seg.peek_dirty(64)
    seg.advance_dirty(n, epoch)
    seg.mark_dirty(seg.get(1).slot)  # leave one entry in the ring for advance
    return list(range(1, 21)), tickets


#: Every locked operation that changes the segment: (the fault site it passes, the call).
#: Operations of one kind share a site (fail, adopt and clock journal a slot
#: as finish and heartbeat do); progress writes one word and needs no journal.
OPS = {
    "insert": ("insert", "seg.push(1000, prio=200)"),
    "claim": ("claim", "seg.pop_batch(4, now_us() + 10**9)"),
    "finish": ("finish", "seg.finish(Ticket(*T[2]))"),
    "fail": ("finish", "seg.fail(Ticket(*T[3]), retry=True, delay_us=10**9)"),
    "cancel": ("cancel", "seg.remove(T[3][0])"),
    "heartbeat": ("heartbeat", "seg.heartbeat(Ticket(*T[3]), now_us() + 10**10)"),
    "clock": ("heartbeat", "seg.clock(Ticket(*T[3]), True, now_us() + 10**10)"),
    "adopt": ("heartbeat", "seg.adopt(Ticket(*T[3]), 7, 5000, 0)"),
    "expire": ("expire", "seg.expire(now_us())"),
    "promote": ("promote", "seg.promote(now_us())"),
    "evict": ("evict", "seg.evict_worst()"),
    "mark_dirty": ("mark_dirty", "seg.mark_dirty(seg.get(5).slot)"),
    "advance": ("advance", "r, n, e = seg.peek_dirty(8); seg.advance_dirty(n, e)"),
    "dedup_insert": ("dedup_insert", "seg.dedup_insert(KEY2, seg.get(12).slot)"),
    "dedup_delete": ("dedup_delete", "seg.dedup_delete(KEY)"),
    "req_reserve": ("req_reserve", "seg.req_reserve(100)"),
    "set_group_limit": ("group", "seg.set_group_limit(1, 3)"),
}

CHILD = """
import json, sys
from engine.shm import Segment, Ticket, key_hash, now_us
seg = Segment.attach(sys.argv[1])
T = json.loads(sys.argv[2])
KEY, KEY2 = key_hash("q", "dedup-me"), key_hash("q", "other")
{op}
print("survived")
"""


def test_every_fault_site_is_reached_by_an_operation():
    assert {site for site, _ in OPS.values()} | {"repair"} == set(faults.SITES)


@pytest.mark.parametrize("op", sorted(OPS))
def test_kill_mid_operation_rolls_back_and_repairs(segname, op):
    site, code = OPS[op]
    seg = Segment.create(segname, 64)
    ids, tickets = populate(seg)
    seg.verify()
    before = snapshot(seg, ids + [1000])

    child = spawn(CHILD.format(op=code), segname, json.dumps(tickets),
                  env={"HEADRACE_FAULT": f"{site}:1"})
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, (child.returncode, out, err)
    assert "survived" not in out

    seg.verify()  # takes the lock: EOWNERDEAD -> repair -> every invariant holds
    assert seg.info()["stats"]["repairs"] == 1
    assert snapshot(seg, ids + [1000]) == before, "the interrupted slot write was not rolled back"

    # The same operation now runs to completion in a healthy process.
    healthy = spawn(CHILD.format(op=code), segname, json.dumps(tickets))
    out, err = healthy.communicate(timeout=60)
    assert healthy.returncode == 0 and "survived" in out, err
    seg.verify()
    seg.close()


def test_kill_mid_evict_parked_rolls_back_and_repairs(segname):
    """Shedding a full group's worst parked task (the writer spills it):
    killed in the middle, the task is back and the group's lists agree."""
    seg = Segment.create(segname, 64)
    seg.set_group_limit(1, 1)
    arr = seg.tasks(4)
    for k in range(4):
        fill_task(arr[k], k + 1, prio=k, group=1)
    seg.push_batch(arr)
    held, n = seg.pop_batch(4, now_us() + FAR)  # one runs; the other three are parked
    assert n == 1 and seg.group_info(1)["parked"] == 3
    recs, n, epoch = seg.peek_dirty(64)
    seg.advance_dirty(n, epoch)  # clean slots: evict refuses dirty ones
    ids = [1, 2, 3, 4]
    before = snapshot(seg, ids)
    code = "seg.evict_parked(1)"
    child = spawn(CHILD.format(op=code), segname, "[]", env={"HEADRACE_FAULT": "evict:1"})
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, (child.returncode, out, err)
    seg.verify()  # repair: everything parked goes back to the ready heap
    assert seg.info()["stats"]["repairs"] == 1
    assert snapshot(seg, ids) == before
    assert seg.group_info(1)["members"] == 4
    assert seg.group_info(1)["parked"] == 0  # parking is redone by claims
    healthy = spawn(CHILD.format(op="seg.pop_batch(4, now_us() + 10**9); assert " + code), segname, "[]")
    out, err = healthy.communicate(timeout=60)
    assert healthy.returncode == 0 and "survived" in out, err
    seg.verify()
    assert seg.group_info(1)["members"] == 3 and seg.get(1) is None  # the worst parked one (prio 0) was shed
    seg.close()


def test_repairer_killed_mid_repair_leaves_a_repairable_segment(segname):
    seg = Segment.create(segname, 64)
    ids, tickets = populate(seg)
    before = snapshot(seg, ids)
    first = spawn(CHILD.format(op=OPS["claim"][1]), segname, json.dumps(tickets), env={"HEADRACE_FAULT": "claim:1"})
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    second = spawn(CHILD.format(op="seg.verify()"), segname, json.dumps(tickets), env={"HEADRACE_FAULT": "repair:1"})
    second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL
    seg.verify()
    assert seg.info()["stats"]["repairs"] == 1  # the killed repair never finished
    assert snapshot(seg, ids) == before
    seg.close()


CONSUMER = """
import json, sys
from engine.shm import Segment, EV_PENDING, COMPLETED, now_us
seg = Segment.attach(sys.argv[1])
finish = sys.argv[2] == "finish"
while seg.info()["stats"]["claimed"] < int(sys.argv[3]):
    pass  # start only once the other consumer is under way
got, idle = [], 0
tickets = seg.tickets(16)
while idle < 20:
    ev = seg.event(EV_PENDING)
    _, n = seg.pop_batch(16, now_us() + 10**9, out=tickets)
    if n == 0:
        idle += not seg.wait(EV_PENDING, ev, 0.02)
        continue
    idle = 0
    got.extend(tickets[k].id for k in range(n))
    if finish:
        seg.finish_batch(tickets, n, COMPLETED)
json.dump(got, sys.stdout)
"""


def test_other_processes_continue_when_a_holder_dies(segname):
    total = 20_000
    seg = Segment.create(segname, total + 16)
    arr = seg.tasks(total)
    for k in range(total):
        fill_task(arr[k], k + 1, prio=k % 7)
    seg.push_batch(arr)
    # The healthy one waits until the doomed one is claiming, so both run
    # when the doomed one dies at its 300th claim.
    doomed = spawn(CONSUMER, segname, "hold", 0, env={"HEADRACE_FAULT": "claim:300"})
    healthy = spawn(CONSUMER, segname, "finish", 100)
    doomed.communicate(timeout=120)
    out, err = healthy.communicate(timeout=120)
    assert doomed.returncode == -signal.SIGKILL
    assert healthy.returncode == 0, err
    done = json.loads(out)
    seg.verify()
    info = seg.info()
    assert info["stats"]["repairs"] == 1
    assert info["counts"]["pending"] == 0
    # What the dead process held is still in the table, running; its lease
    # expiry hands it back, and then every item is accounted for exactly once.
    held = info["counts"]["running"]
    assert held == 299  # 299 whole claims; the 300th was rolled back
    _, n = seg.expire(now_us() + 2 * 10**9, max=total)
    assert n == held
    rest, m = seg.pop_batch(total, now_us() + 10**9)
    recovered = [rest[k].id for k in range(m)]
    assert sorted(done + recovered) == list(range(1, total + 1))
    assert info["counts"]["completed"] == len(done)
    seg.close()
