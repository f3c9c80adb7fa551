"""Real processes pushing and popping one segment concurrently."""
from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from engine import shm
from engine.shm import (EV_COMMIT, EV_PENDING, EV_WRITER, Segment, fill_task, quota_cpus, quota_cpus_v1, runnable_fit,
                        spin_slots, usable_cpus)

from helpers import run_child, spawn

PRODUCER = """
import sys, time
from engine.shm import Segment, fill_task
seg = Segment.attach(sys.argv[1])
first, count, batch = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
arr = seg.tasks(batch)
todo = list(range(first, first + count))
while todo:
    chunk, todo = todo[:batch], todo[batch:]
    for k, id in enumerate(chunk):
        fill_task(arr[k], id, prio=id % 5)
    out, ok = seg.push_batch(arr, len(chunk))
    full = [id for k, id in enumerate(chunk) if out[k] == -1]  # capacity: retry later
    assert ok + len(full) == len(chunk), [out[k] for k in range(len(chunk))]
    if full:
        todo = full + todo
        time.sleep(0.001)
"""

CONSUMER = """
import json, sys
from engine import errors
from engine.shm import Segment, EV_PENDING, COMPLETED, now_us
seg = Segment.attach(sys.argv[1])
total, batch = int(sys.argv[2]), int(sys.argv[3])
tickets, statuses, recs = seg.tickets(batch), seg.statuses(batch), seg.dirty_records(1024)
got = []
idle = 0
while idle < 40:
    ev = seg.event(EV_PENDING)
    _, n = seg.pop_batch(batch, now_us() + 60_000_000, out=tickets)
    if n == 0:
        if not seg.wait(EV_PENDING, ev, 0.05):
            idle += 1
        continue
    idle = 0
    got.extend(tickets[k].id for k in range(n))
    _, ok = seg.finish_batch(tickets, n, COMPLETED, out=statuses)
    assert ok == n
    while True:  # free completed slots so producers never starve
        _, m, epoch = seg.peek_dirty(1024, out=recs)
        if m == 0:
            break
        try:
            seg.advance_dirty(m, epoch)
        except (errors.Stale, errors.InvalidArgument):
            pass  # the other consumer drained or repaired the ring between our peek and advance
json.dump(got, sys.stdout)
"""


@pytest.mark.parametrize("producers,consumers", [(1, 1), (2, 2), (2, 1)])
def test_every_item_comes_out_exactly_once(segname, producers, consumers):
    per_producer = 20_000
    seg = Segment.create(segname, 4096)  # far below the item count: slots are recycled
    procs = [spawn(CONSUMER, segname, per_producer * producers, 64) for _ in range(consumers)]
    procs += [spawn(PRODUCER, segname, 1 + p * per_producer, per_producer, 100)
              for p in range(producers)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
    seen = [id for out in outs[:consumers] for id in json.loads(out)]
    assert len(seen) == len(set(seen)), "an item came out twice"
    assert sorted(seen) == list(range(1, per_producer * producers + 1)), "an item was lost"
    seg.verify()
    assert seg.info()["counts"]["running"] == 0
    seg.close()


def test_waiter_in_another_process_wakes_on_push(segname):
    seg = Segment.create(segname, 16)
    ev = seg.event(EV_PENDING)
    child = spawn("""
        import sys, time
        from engine.shm import Segment, EV_PENDING
        seg = Segment.attach(sys.argv[1])
        print("waiting", flush=True)
        t = time.monotonic()
        woke = seg.wait(EV_PENDING, int(sys.argv[2]), 10.0)
        print(woke, time.monotonic() - t)
    """, segname, ev)
    # Push only once the child is about to wait (a slow start must not
    # turn this into a wait that finds the event already bumped).
    assert child.stdout.readline().strip() == "waiting"
    time.sleep(0.3)
    seg.push(1)
    woke, waited = child.communicate(timeout=30)[0].split()
    assert woke == "True" and 0.2 < float(waited) < 5.0
    seg.close()


WAITER = """
import sys, time
from engine.shm import Segment, EV_PENDING
seg = Segment.attach(sys.argv[1])
print("waiting", flush=True)
t = time.monotonic()
woke = seg.wait(EV_PENDING, int(sys.argv[2]), float(sys.argv[3]))
print(woke, time.monotonic() - t)
"""


@pytest.mark.parametrize("tasks", [1, 2])
def test_placing_tasks_wakes_as_many_waiters_as_there_are_tasks(segname, tasks):
    """Waking every worker for each one-by-one task made them take turns
    preempting the producer and the writer on 2 cores."""
    seg = Segment.create(segname, 16)
    ev = seg.event(EV_PENDING)
    waiters = [spawn(WAITER, segname, ev, 3.0) for _ in range(2)]
    for w in waiters:
        assert w.stdout.readline().strip() == "waiting"
    # Both asleep on the futex (past their spin), not still on their way to it.
    deadline = time.monotonic() + 10
    while not all(psutil.Process(w.pid).status() == psutil.STATUS_SLEEPING for w in waiters):
        assert time.monotonic() < deadline, "the waiters never went to sleep"
        time.sleep(0.01)
    time.sleep(0.2)
    arr = seg.tasks(tasks)
    for k in range(tasks):
        fill_task(arr[k], 1 + k)
    seg.push_batch(arr, tasks)
    results = sorted(float(w.communicate(timeout=30)[0].split()[1]) for w in waiters)
    woken = [r for r in results if r < 2.0]
    assert len(woken) == tasks, results  # the others slept on to their timeout
    assert all(r > 2.9 for r in results[tasks:]), results
    seg.close()


CLAIMER = """
import sys, time
from engine.shm import Segment, EV_PENDING, now_us
seg = Segment.attach(sys.argv[1])
print("waiting", flush=True)
t = time.monotonic()
while time.monotonic() - t < 10:
    seen = seg.event(EV_PENDING)
    buf, n = seg.pop_batch(1, now_us() + 60_000_000)
    if n:
        print(buf[0].id, time.monotonic() - t, flush=True)
        break
    seg.wait(EV_PENDING, seen, 3.0)
"""


@pytest.mark.parametrize("how", ["complete", "fail", "cancel"])
def test_a_finished_group_member_wakes_a_claimer_for_the_task_it_lets_go(segname, how):
    """A parked task of a limited group becomes claimable when a member
    ends: a sleeping claimer is woken for it (it waited for its timeout)."""
    seg = Segment.create(segname, 16)
    seg.set_group_limit(1, 1)
    seg.push(1, group=1)
    seg.push(2, group=1, seq=1)  # parked: the group's one place is taken once 1 runs
    buf, n = seg.pop_batch(1, shm.now_us() + 60_000_000)
    assert n == 1 and buf[0].id == 1
    ticket = shm.Ticket(buf[0].id, buf[0].slot, buf[0].attempt)
    claimer = spawn(CLAIMER, segname)
    assert claimer.stdout.readline().strip() == "waiting"
    time.sleep(0.5)  # it found nothing claimable and sleeps
    t = time.monotonic()
    if how == "complete":
        assert seg.finish(ticket)
    elif how == "fail":
        assert seg.fail(ticket, retry=False) == shm.DEAD
    else:
        seg.cancel(1)
    tid, _ = claimer.communicate(timeout=30)[0].split()
    assert int(tid) == 2
    assert time.monotonic() - t < 2.0, "the claimer slept to its timeout"
    seg.close()


def test_runnable_fit_reads_the_running_count_of_proc_loadavg():
    assert runnable_fit("0.28 0.54 0.61 1/76 22393\n", 2) is True
    assert runnable_fit("0.28 0.54 0.61 2/76 22393", 2) is True
    assert runnable_fit("3.10 2.54 1.61 3/76 22393", 2) is False
    # Text that does not say (gVisor's "0/0" among it) is unknown, not a verdict.
    for bad in ("", "0.28 0.54", "0.28 0.54 0.61 x/76 1", "0.28 0.54 0.61 2", "0.00 0.00 0.00 0/0 0"):
        assert runnable_fit(bad, 2) is None, bad


def test_quota_cpus_reads_cgroup_cpu_max():
    assert quota_cpus("max 100000\n") == 0
    assert quota_cpus("200000 100000\n") == 2
    assert quota_cpus("150000 100000") == 2  # rounded up
    assert quota_cpus("50000 100000") == 1
    for bad in ("", "x 1", "100000", "-5 100000", "100 0", "maximum 100000"):
        assert quota_cpus(bad) is None, bad


def test_quota_cpus_v1_reads_cgroup_v1_cfs_quota_and_period():
    assert quota_cpus_v1("-1\n", "100000\n") == 0  # no limit
    assert quota_cpus_v1("200000\n", "100000\n") == 2
    assert quota_cpus_v1("150000", "100000") == 2  # rounded up
    assert quota_cpus_v1("50000\n", "100000\n") == 1
    for quota, period in (("", "100000"), ("x", "100000"), ("0", "100000"), ("-5", "100000"), ("100000", "0"),
                          ("100000", ""), ("100000 1", "100000")):
        assert quota_cpus_v1(quota, period) is None, (quota, period)


V1_CPU = "/sys/fs/cgroup/cpu"


def _v1_cpu_cgroup_writable() -> bool:
    """Whether this host has cgroup v1's cpu controller and lets us make a cgroup in it."""
    probe = os.path.join(V1_CPU, f"headrace-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    os.rmdir(probe)
    return os.path.exists(os.path.join(V1_CPU, "cpu.cfs_quota_us"))


@pytest.mark.skipif(not _v1_cpu_cgroup_writable(), reason="needs cgroup v1's cpu controller, writable (root)")
def test_a_process_in_a_cgroup_v1_with_a_one_cpu_quota_counts_one():
    """A container on cgroup v1 limited to one CPU: the spin rule counts one
    (it counted the host's CPUs, so its spinners burnt the quota)."""
    group = os.path.join(V1_CPU, f"headrace-test-{os.getpid()}")
    os.mkdir(group)
    try:
        with open(os.path.join(group, "cpu.cfs_period_us"), "w") as f:
            f.write("100000")
        with open(os.path.join(group, "cpu.cfs_quota_us"), "w") as f:
            f.write("100000")
        r = run_child(f"""
            import os
            with open({os.path.join(group, "cgroup.procs")!r}, "w") as f:
                f.write(str(os.getpid()))
            from engine import shm
            print(shm.usable_cpus())
        """)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == 1
    finally:
        os.rmdir(group)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs an affinity mask of 2 CPUs or more to narrow")
def test_a_process_pinned_to_one_cpu_counts_one_and_nothing_of_it_spins():
    """A container's quota or an affinity mask leaves a process fewer CPUs
    than the machine has: the spin rule counts those it may use."""
    assert usable_cpus() <= len(os.sched_getaffinity(0))
    out = run_child("""
        import os
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        from engine import shm
        print(shm.usable_cpus(), *(shm.spin_slots(ev) for ev in (shm.EV_WRITER, shm.EV_COMMIT, shm.EV_PENDING)))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0", "0", "0"]


@pytest.mark.skipif(usable_cpus() < 2, reason="one usable CPU: nothing may spin")
def test_the_writer_and_a_producer_spin_only_while_the_runnable_processes_fit_the_cores():
    share = spin_slots(EV_PENDING) + 1  # workers: only with a core to spare besides the writer's
    cores = usable_cpus()

    def idle() -> bool:
        with open("/proc/loadavg") as f:
            return runnable_fit(f.read(), cores) is True
    # Whenever the machine looks idle, a producer waiting for its commit
    # takes the writer's share, and the writer its own (a look may race
    # with the load changing, so some of them must agree, not each).
    for ev in (EV_COMMIT, EV_WRITER):
        looks = [spin_slots(ev) == share for _ in range(400) if idle() or time.sleep(0.005)]
        if not looks:
            pytest.skip("the machine never looked idle for 2 s")
        assert any(looks), ev
    hogs = [spawn("while True: pass") for _ in range(os.cpu_count() or 2)]
    try:
        deadline = time.monotonic() + 30
        while not all(psutil.Process(h.pid).cpu_times().user > 0.2 for h in hogs):  # all of them spinning
            assert time.monotonic() < deadline, "the CPU hogs never ran"
            time.sleep(0.05)
        # Overloaded, the writer and a producer spin no more than workers do
        # (on 2 cores: not at all).
        for ev in (EV_COMMIT, EV_WRITER, EV_PENDING):
            assert [spin_slots(ev) for _ in range(20)] == [share - 1] * 20, ev
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def test_wait_times_out_without_an_event(seg):
    t = time.monotonic()
    assert seg.wait(EV_PENDING, seg.event(EV_PENDING), 0.1) is False
    assert 0.09 < time.monotonic() - t < 2.0
    assert seg.wait(EV_PENDING, seg.event(EV_PENDING) + 1, 5.0) is True  # already differs


INTERRUPTED = """
import signal, sys, time
from engine.shm import Segment, EV_PENDING

class Boom(Exception):
    pass

def boom(signum, frame):
    raise Boom()

signal.signal(signal.SIGUSR1, boom)
seg = Segment.attach(sys.argv[1])
pos = seg.req_send(b"nobody answers this", 64) if sys.argv[2] == "answer" else None
print("waiting", flush=True)
t = time.monotonic()
try:
    if pos is None:
        got = seg.wait(EV_PENDING, seg.event(EV_PENDING), 30.0)
    else:
        got = seg.req_await(pos, 30.0)
    for _ in range(1000):  # the handler runs at the interpreter's next check, if not at once
        pass
    print("returned", got, time.monotonic() - t)
except Boom:
    print("interrupted", time.monotonic() - t)
"""


@pytest.mark.parametrize("what", ["event", "answer"])
def test_a_signal_cuts_a_wait_short_so_that_its_python_handler_runs_at_once(segname, what):
    """A wait slept through signals: Ctrl-C reached a process waiting for a
    commit or a task only when its wait ended (up to a timeout's length)."""
    seg = Segment.create(segname, 16)
    child = spawn(INTERRUPTED, segname, what)
    try:
        assert child.stdout.readline().strip() == "waiting"
        time.sleep(0.3)  # inside the wait by now
        child.send_signal(signal.SIGUSR1)
        out, err = child.communicate(timeout=60)
        words = out.split()
        assert words[0] == "interrupted", (out, err)
        assert float(words[1]) < 5.0, out  # not the 30 s of the wait
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        seg.close()


def test_notify_counts_even_without_waiters(seg):
    before = seg.event(EV_PENDING)
    seg.notify(EV_PENDING)
    assert seg.event(EV_PENDING) == (before + 1) & 0xFFFFFFFF


def test_attach_from_child_sees_parent_state(segname):
    seg = Segment.create(segname, 16)
    seg.push(42, prio=9)
    r = run_child(f"""
        from engine.shm import Segment
        s = Segment.attach({segname!r})
        print(s.get(42).prio, s.generation)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["9", str(seg.generation)]
    seg.close()
