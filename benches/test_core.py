"""Benchmarks of the native core (``engine._core`` through ``engine.shm.Segment``).

Run:  pytest benches/ --benchmark-only -q -p no:cacheprovider

What one round measures (times are per round; items/s = items / median):

* push single / batched - ``seg.push`` x 256, or one ``push_batch`` of 1000
  fresh tasks with random priorities.  Setup (untimed) cancels the previous
  round's tasks and drains the dirty ring, so every round starts at exactly
  `live` pending entries and ends at live + 256 (resp. + 1000; at 1k live a
  batched round therefore goes 1k -> 2k).
* pop single / batched - ``seg.pop`` x 256, or one ``pop_batch(256)``.  A pop
  is a claim (pop + set running + mark dirty, one C call).  Setup completes
  the previous round's tickets, frees them (dirty-ring drain) and pushes 256
  fresh random-priority tasks, so every round starts at `live` pending.
* claim+complete single / batched - (``pop`` + ``finish``) x 256, or one
  ``pop_batch(256)`` + one ``finish_batch``.  Setup drains the ring (frees
  the 256 completed slots) and pushes 256 fresh tasks.  The ring drain is
  *not* in the timed region here; it is in the multi-process benchmark.
* claim+complete, N processes at 1M live - worker processes (fork) each
  attach to the segment and loop ``pop_batch(256)`` / ``finish_batch`` /
  ``peek_dirty(512)`` + ``advance_dirty`` until they together did 200,000
  items; the parent times from releasing the workers until all reported.
  Pending count goes 1M -> 800k within a round; setup restores it.  Run with
  1 worker (baseline), and 2 workers with lock spinning on (default 100
  trylock rounds), off (``set_lock_spin(0)``: plain robust mutex) and long
  (100,000 rounds).  extra_info also records each worker's own rate, how
  evenly the workers' wall times overlapped, their CPU share and the
  segment's lock counters.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from engine import errors, shm
from engine.shm import COMPLETED, Segment

from conftest import HEADROOM, SIZE_IDS, SIZES, lease_until  # noqa: E402  (benches/ is on sys.path)

SINGLE_ITEMS = 256     # calls per round for the one-item-per-call cases
PUSH_BATCH = 1000      # items per push_batch call
POP_BATCH = 256        # items per pop_batch / finish_batch call
SINGLE_ROUNDS = 50
BATCH_ROUNDS = 200
WARMUP = 3

sizes = pytest.mark.parametrize("live", SIZES, ids=SIZE_IDS)


# ---- push ----------------------------------------------------------------

def _push_setup(q):
    """Cancel what the previous round pushed and free it: back to `live` pending."""
    state = {"ids": range(0)}

    def setup():
        for i in state["ids"]:
            q.seg.cancel(i)
        q.drain()
        return state

    return setup


@pytest.mark.benchmark(group="push")
@sizes
def test_push_single(benchmark, make_queue, record, live):
    q = make_queue(live)
    reset = _push_setup(q)

    def setup():
        state = reset()
        first = q.next_id
        q.next_id += SINGLE_ITEMS
        state["ids"] = range(first, first + SINGLE_ITEMS)
        prios = list(q.rng.randbytes(SINGLE_ITEMS))
        return (state["ids"], prios), {}

    def run(ids, prios):
        push = q.seg.push
        for i, p in zip(ids, prios):
            push(i, prio=p)

    benchmark.pedantic(run, setup=setup, rounds=SINGLE_ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert q.pending() == live + SINGLE_ITEMS
    record(SINGLE_ITEMS, live, per_call=1)


@pytest.mark.benchmark(group="push")
@sizes
def test_push_batch(benchmark, make_queue, record, live):
    q = make_queue(live)
    reset = _push_setup(q)
    arr = Segment.tasks(PUSH_BATCH)
    out = Segment.statuses(PUSH_BATCH)

    def setup():
        state = reset()
        first = q.next_id
        q.tasks(PUSH_BATCH, out=arr)
        state["ids"] = range(first, first + PUSH_BATCH)
        return (), {}

    def run():
        _, ok = q.seg.push_batch(arr, PUSH_BATCH, out=out)
        assert ok == PUSH_BATCH

    benchmark.pedantic(run, setup=setup, rounds=BATCH_ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert q.pending() == live + PUSH_BATCH
    record(PUSH_BATCH, live, per_call=PUSH_BATCH)


# ---- pop (claim) ---------------------------------------------------------------

@pytest.mark.benchmark(group="pop")
@sizes
def test_pop_single(benchmark, make_queue, record, live):
    q = make_queue(live)
    held = []

    def setup():
        for t in held:
            assert q.seg.finish(t)
        held.clear()
        q.top_up()  # frees the completed slots, pushes fresh tasks back to `live`
        return (), {}

    def run():
        pop = q.seg.pop
        lease = lease_until()
        keep = held.append
        for _ in range(SINGLE_ITEMS):
            keep(pop(lease))

    benchmark.pedantic(run, setup=setup, rounds=SINGLE_ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert len(held) == SINGLE_ITEMS and None not in held
    record(SINGLE_ITEMS, live, per_call=1)


@pytest.mark.benchmark(group="pop")
@sizes
def test_pop_batch(benchmark, make_queue, record, live):
    q = make_queue(live)
    tickets = Segment.tickets(POP_BATCH)
    got = [0]

    def setup():
        q.complete(tickets, got[0])
        got[0] = 0
        q.top_up()
        return (), {}

    def run():
        _, got[0] = q.seg.pop_batch(POP_BATCH, lease_until(), out=tickets)

    benchmark.pedantic(run, setup=setup, rounds=BATCH_ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert got[0] == POP_BATCH
    record(POP_BATCH, live, per_call=POP_BATCH)


# ---- claim + complete ---------------------------------------------------------

@pytest.mark.benchmark(group="claim+complete")
@sizes
def test_claim_complete_single(benchmark, make_queue, record, live):
    q = make_queue(live)
    done = [0]

    def setup():
        q.top_up()
        return (), {}

    def run():
        seg = q.seg
        pop, finish = seg.pop, seg.finish
        lease = lease_until()
        ok = 0
        for _ in range(SINGLE_ITEMS):
            ok += finish(pop(lease))
        done[0] = ok

    benchmark.pedantic(run, setup=setup, rounds=SINGLE_ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert done[0] == SINGLE_ITEMS
    record(SINGLE_ITEMS, live, per_call=1)


@pytest.mark.benchmark(group="claim+complete")
@sizes
def test_claim_complete_batch(benchmark, make_queue, record, live):
    q = make_queue(live)
    tickets = Segment.tickets(POP_BATCH)
    statuses = Segment.statuses(POP_BATCH)
    done = [0]

    def setup():
        q.top_up()
        return (), {}

    def run():
        seg = q.seg
        _, n = seg.pop_batch(POP_BATCH, lease_until(), out=tickets)
        _, done[0] = seg.finish_batch(tickets, n, COMPLETED, out=statuses)

    benchmark.pedantic(run, setup=setup, rounds=BATCH_ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert done[0] == POP_BATCH
    record(POP_BATCH, live, per_call=POP_BATCH)


# ---- claim + complete from several processes ---------------------------------

MP_LIVE = 1_000_000
MP_ITEMS = 200_000     # per round, split evenly across the workers
MP_DRAIN = 2 * POP_BATCH
MP_ROUNDS = 3


def _cc_worker(name, quota, spin, ready, go, results, flusher):
    """One worker process: attach, wait for the start signal, claim+complete `quota` items.

    After each batch the worker acts as the flusher (peek + advance of the
    dirty ring, no disk write) if no other worker is doing so: the ring has a
    single-consumer contract (an advance must follow its own peek), so the
    role is taken with a non-blocking try of a cross-process lock.
    """
    try:
        shm.set_lock_spin(spin)
        seg = Segment.attach(name)
        tickets = seg.tickets(POP_BATCH)
        statuses = seg.statuses(POP_BATCH)
        recs = seg.dirty_records(MP_DRAIN)
        lease = lease_until()
        pop_batch, finish_batch = seg.pop_batch, seg.finish_batch
        peek, advance = seg.peek_dirty, seg.advance_dirty
        ready.put(("ready",))
        go.wait()
        t0 = time.perf_counter()
        c0 = time.process_time()
        done = freed = drains = 0
        while done < quota:
            _, n = pop_batch(min(POP_BATCH, quota - done), lease, out=tickets)
            if n == 0:
                break
            _, ok = finish_batch(tickets, n, COMPLETED, out=statuses)
            done += ok
            if flusher.acquire(False):
                try:
                    _, k, epoch = peek(MP_DRAIN, out=recs)
                    if k:
                        freed += advance(k, epoch)
                    drains += 1
                except errors.Stale:
                    pass
                finally:
                    flusher.release()
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        seg.close()
        results.put(("done", done, elapsed, freed, drains, cpu))
    except BaseException as e:  # report, never hang the parent
        results.put(("error", 0, 0.0, repr(e), 0, 0.0))
        ready.put(("error", repr(e)))
        raise


@pytest.mark.benchmark(group="claim+complete multiprocess (1M live)")
@pytest.mark.parametrize("procs,spin", [(1, 100), (2, 100), (2, 0), (2, 100_000)],
                         ids=["1proc", "2proc-spin100", "2proc-spin0", "2proc-spin100k"])
def test_claim_complete_mp(benchmark, make_queue, record, procs, spin):
    ctx = mp.get_context("fork")
    q = make_queue(MP_LIVE, capacity=MP_LIVE + HEADROOM)
    quota = MP_ITEMS // procs
    total = quota * procs
    running = []
    rounds = []
    stats0 = {}

    ring_left = []

    def reap():
        if not running:
            return
        for p in running:
            p.join(30)
            assert p.exitcode == 0, f"worker exit code {p.exitcode}"
        running.clear()
        ring_left.append(q.seg.info()["ring"])  # dirty entries the workers left behind

    def setup():
        reap()
        q.top_up()  # free what the last round completed, refill to 1M pending
        stats0.update(q.seg.info()["stats"])
        ready, results, go = ctx.SimpleQueue(), ctx.SimpleQueue(), ctx.Event()
        flusher = ctx.Lock()
        for _ in range(procs):
            p = ctx.Process(target=_cc_worker, args=(q.name, quota, spin, ready, go, results, flusher))
            p.start()
            running.append(p)
        for _ in range(procs):
            msg = ready.get()
            assert msg[0] == "ready", msg
        return (go, results), {}

    def run(go, results):
        go.set()
        out = [results.get() for _ in range(procs)]
        rounds.append((out, stats0.copy()))

    try:
        benchmark.pedantic(run, setup=setup, rounds=MP_ROUNDS, warmup_rounds=0, iterations=1)
        reap()
        rounds_end_stats = [q.seg.info()["stats"]]
    finally:
        for p in running:
            if p.is_alive():
                p.kill()
            p.join()
    for out, _ in rounds:
        assert all(m[0] == "done" for m in out), out
        assert sum(m[1] for m in out) == total, out
    after = rounds_end_stats[0]
    first = rounds[0][1]
    n = len(rounds)
    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    # Each worker's own rate (in-worker timing), median over workers and rounds.
    per_worker = [m[1] / m[2] for out, _ in rounds for m in out]
    # Fairness: shortest / longest worker wall time in a round (1.0 = both
    # worked the whole round; ~0.5 = one ran while the other mostly slept).
    spread = [min(m[2] for m in out) / max(m[2] for m in out) for out, _ in rounds]
    # Busy share: worker CPU time / (workers x longest worker wall time).
    busy = [sum(m[5] for m in out) / (procs * max(m[2] for m in out)) for out, _ in rounds]
    extra = {
        "procs": procs,
        "spin": spin,
        "worker_items_per_s": round(median(per_worker)),
        "worker_wall_min_over_max": round(median(spread), 2),
        "worker_cpu_busy": round(median(busy), 2),
        # Lock counters over the whole benchmark (rounds + refills), per round.
        # With spin 0 every acquisition counts as a "sleep" (it goes straight
        # to pthread_mutex_lock), contended or not.
        "lock_spins_won": (after["lock_spins_won"] - first["lock_spins_won"]) // n,
        "lock_sleeps": (after["lock_sleeps"] - first["lock_sleeps"]) // n,
        "ring_left_max": max(ring_left),
        "drains_per_round": sum(m[4] for out, _ in rounds for m in out) // n,
    }
    record(total, MP_LIVE, **extra)

