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
* N processes at 1M live - 1 worker (baseline) or 2 worker processes
  (fork) attach to the segment and together do a fixed number of items per
  round; the parent times from releasing the workers until all reported.
  Modes: push batched (``push_batch`` of 1000) / single, 200k / 50k items per
  round, pending 1M -> 1.2M / 1.05M; pop batched (``pop_batch(256)``) /
  single, 200k / 50k, pending 1M -> 800k / 950k; claim+complete batched
  (``pop_batch(256)`` / ``finish_batch``) / single (``pop`` + ``finish``),
  200k / 50k, where after every 256 items a worker also takes the flusher
  role if free (``peek_dirty(512)`` + ``advance_dirty``: the ring drain *is*
  timed here).  After reporting, workers undo their round untimed (cancel
  what they pushed, complete what they popped) and setup restores 1M
  pending.  Lock spinning is the default (100 trylock rounds); claim+complete
  single also runs with spinning off (``set_lock_spin(0)``: plain robust
  mutex), claim+complete batched with off and long (100,000 rounds).
  extra_info also records each worker's own rate, how evenly the workers'
  wall times overlapped, their CPU share and the segment's lock counters.
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


# ---- push, pop and claim+complete from several processes -----------------------

MP_LIVE = 1_000_000
MP_DRAIN = 2 * POP_BATCH
MP_ROUNDS = 3
#: Items per round (split evenly across the workers) and items per call, by mode.
MP_ITEMS = {"push_batch": 200_000, "push_single": 50_000, "pop_batch": 200_000,
            "pop_single": 50_000, "cc_batch": 200_000, "cc_single": 50_000}
MP_PER_CALL = {"push_batch": PUSH_BATCH, "pop_batch": POP_BATCH, "cc_batch": POP_BATCH}
MP_PROCS = [(1, 100), (2, 100)]
MP_PROC_IDS = ["1proc", "2proc-spin100"]


def _mp_worker(name, mode, quota, spin, work, ready, go, cleanup, results, flusher):
    """One worker process: attach, wait for the start signal, do `quota` items of `mode`.

    Items go in chunks (one batch call, or SINGLE_ITEMS single calls).  In the
    claim+complete modes, after each chunk the worker acts as the flusher
    (peek + advance of the dirty ring, no disk write) if no other worker is
    doing so: the ring has a single-consumer contract (an advance must follow
    its own peek), so the role is taken with a non-blocking try of a
    cross-process lock.  After reporting, the worker waits for `cleanup` and
    then undoes its round untimed (cancels what it pushed, completes what it
    popped) so the parent's setup can restore `live` pending.
    """
    try:
        shm.set_lock_spin(spin)
        seg = Segment.attach(name)
        lease = lease_until()
        ids, payload = work
        held = seg.tickets(quota) if mode == "pop_batch" else []
        tickets = seg.tickets(POP_BATCH)
        statuses = seg.statuses(max(PUSH_BATCH, POP_BATCH))
        recs = seg.dirty_records(MP_DRAIN)
        pop, finish, pop_batch, finish_batch = seg.pop, seg.finish, seg.pop_batch, seg.finish_batch
        push, push_batch = seg.push, seg.push_batch
        peek, advance = seg.peek_dirty, seg.advance_dirty

        def step(done, k):  # k items starting at item `done`; returns items done
            if mode == "push_batch":
                return push_batch(payload + done, k, out=statuses)[1]
            if mode == "push_single":
                for i, p in zip(ids[done:done + k], payload[done:done + k]):
                    push(i, prio=p)
                return k
            if mode == "pop_batch":
                return pop_batch(k, lease, out=held + done)[1]
            if mode == "pop_single":
                keep = held.append
                for _ in range(k):
                    keep(pop(lease))
                return k - held[-k:].count(None)
            if mode == "cc_batch":
                _, n = pop_batch(k, lease, out=tickets)
                return finish_batch(tickets, n, COMPLETED, out=statuses)[1]
            ok = 0  # cc_single
            for _ in range(k):
                ok += finish(pop(lease))
            return ok

        chunk = MP_PER_CALL.get(mode, SINGLE_ITEMS)
        flush = mode.startswith("cc_")
        ready.put(("ready",))
        go.wait()
        t0 = time.perf_counter()
        c0 = time.process_time()
        done = freed = drains = 0
        while done < quota:
            n = step(done, min(chunk, quota - done))
            if n == 0:
                break
            done += n
            if flush and flusher.acquire(False):
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
        results.put(("done", done, elapsed, freed, drains, cpu))
        cleanup.wait()
        if mode.startswith("push"):
            for i in ids[:done]:
                seg.cancel(i)
        elif mode == "pop_batch":
            for off in range(0, done, POP_BATCH):
                k = min(POP_BATCH, done - off)
                assert finish_batch(held + off, k, COMPLETED, out=statuses)[1] == k
        elif mode == "pop_single":
            for t in held:
                assert finish(t)
        seg.close()
    except BaseException as e:  # report, never hang the parent
        results.put(("error", 0, 0.0, repr(e), 0, 0.0))
        ready.put(("error", repr(e)))
        raise


def _run_mp(benchmark, make_queue, record, mode, procs, spin):
    """Time `procs` forked workers doing MP_ITEMS[mode] items of `mode` at MP_LIVE pending."""
    ctx = mp.get_context("fork")
    quota = MP_ITEMS[mode] // procs
    total = quota * procs
    pushes = total if mode.startswith("push") else 0
    q = make_queue(MP_LIVE, capacity=MP_LIVE + pushes + HEADROOM)
    running = []
    rounds = []
    stats0 = {}
    ring_left = []
    lock_use = []  # per round: (spins won, sleeps) during the timed part only
    cleanup = [None]

    def reap():
        if not running:
            return
        info = q.seg.info()
        ring_left.append(info["ring"])  # dirty entries the round left behind
        lock_use.append(tuple(info["stats"][k] - stats0[k] for k in ("lock_spins_won", "lock_sleeps")))
        cleanup[0].set()  # workers undo their round (untimed), then exit
        for p in running:
            p.join(60)
            assert p.exitcode == 0, f"worker exit code {p.exitcode}"
        running.clear()

    def setup():
        reap()
        q.top_up()  # free what the last round finished/cancelled, refill to `live` pending
        stats0.update(q.seg.info()["stats"])
        ready, results, go, cleanup[0] = ctx.SimpleQueue(), ctx.SimpleQueue(), ctx.Event(), ctx.Event()
        flusher = ctx.Lock()
        for _ in range(procs):
            # Push work is built here, before the fork: fresh ids, random priorities.
            ids = range(q.next_id, q.next_id + quota) if pushes else range(0)
            payload = None
            if mode == "push_batch":
                payload = q.tasks(quota)
            elif mode == "push_single":
                q.next_id += quota
                payload = list(q.rng.randbytes(quota))
            p = ctx.Process(target=_mp_worker, args=(q.name, mode, quota, spin, (ids, payload),
                                                     ready, go, cleanup[0], results, flusher))
            p.start()
            running.append(p)
        for _ in range(procs):
            msg = ready.get()
            assert msg[0] == "ready", msg
        return (go, results), {}

    def run(go, results):
        go.set()
        out = [results.get() for _ in range(procs)]
        rounds.append(out)

    try:
        benchmark.pedantic(run, setup=setup, rounds=MP_ROUNDS, warmup_rounds=0, iterations=1)
        reap()
    finally:
        for p in running:
            if p.is_alive():
                p.kill()
            p.join()
    for out in rounds:
        assert all(m[0] == "done" for m in out), out
        assert sum(m[1] for m in out) == total, out
    n = len(rounds)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    # Each worker's own rate (in-worker timing), median over workers and rounds.
    per_worker = [m[1] / m[2] for out in rounds for m in out]
    # Fairness: shortest / longest worker wall time in a round (1.0 = both
    # worked the whole round; ~0.5 = one ran while the other mostly slept).
    spread = [min(m[2] for m in out) / max(m[2] for m in out) for out in rounds]
    # Busy share: worker CPU time / (workers x longest worker wall time).
    busy = [sum(m[5] for m in out) / (procs * max(m[2] for m in out)) for out in rounds]
    extra = {
        "mode": mode,
        "procs": procs,
        "spin": spin,
        "per_call": MP_PER_CALL.get(mode, 1),
        "worker_items_per_s": round(median(per_worker)),
        "worker_wall_min_over_max": round(median(spread), 2),
        "worker_cpu_busy": round(median(busy), 2),
        # Lock counters of the timed part of a round (median over rounds; the
        # untimed undo and refill are excluded).  With spin 0 every acquisition
        # counts as a "sleep" (it goes straight to pthread_mutex_lock),
        # contended or not.
        "lock_spins_won": median([u[0] for u in lock_use]),
        "lock_sleeps": median([u[1] for u in lock_use]),
        "ring_left_max": max(ring_left),
        "drains_per_round": sum(m[4] for out in rounds for m in out) // n,
    }
    record(total, MP_LIVE, **extra)


mp_procs = pytest.mark.parametrize("procs,spin", MP_PROCS, ids=MP_PROC_IDS)


@pytest.mark.benchmark(group="push multiprocess (1M live)")
@mp_procs
def test_push_batch_mp(benchmark, make_queue, record, procs, spin):
    _run_mp(benchmark, make_queue, record, "push_batch", procs, spin)


@pytest.mark.benchmark(group="push multiprocess (1M live)")
@mp_procs
def test_push_single_mp(benchmark, make_queue, record, procs, spin):
    _run_mp(benchmark, make_queue, record, "push_single", procs, spin)


@pytest.mark.benchmark(group="pop multiprocess (1M live)")
@mp_procs
def test_pop_batch_mp(benchmark, make_queue, record, procs, spin):
    _run_mp(benchmark, make_queue, record, "pop_batch", procs, spin)


@pytest.mark.benchmark(group="pop multiprocess (1M live)")
@mp_procs
def test_pop_single_mp(benchmark, make_queue, record, procs, spin):
    _run_mp(benchmark, make_queue, record, "pop_single", procs, spin)


@pytest.mark.benchmark(group="claim+complete multiprocess (1M live)")
@pytest.mark.parametrize("procs,spin", MP_PROCS + [(2, 0)], ids=MP_PROC_IDS + ["2proc-spin0"])
def test_claim_complete_single_mp(benchmark, make_queue, record, procs, spin):
    _run_mp(benchmark, make_queue, record, "cc_single", procs, spin)


@pytest.mark.benchmark(group="claim+complete multiprocess (1M live)")
@pytest.mark.parametrize("procs,spin", MP_PROCS + [(2, 0), (2, 100_000)],
                         ids=MP_PROC_IDS + ["2proc-spin0", "2proc-spin100k"])
def test_claim_complete_mp(benchmark, make_queue, record, procs, spin):
    """Batched claim+complete (name kept from before the single-item cases were added)."""
    _run_mp(benchmark, make_queue, record, "cc_batch", procs, spin)
