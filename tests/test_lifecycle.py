"""The task lifecycle across real processes: retries and backoff, dead
letters, results, timeouts and fenced leases, heartbeats, delays,
cancellation and progress.  Each test fails if its feature is removed."""
from __future__ import annotations

import calendar
import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, List

import apsw
import pytest

import engine
from engine import Backoff, errors, paths, shm
from engine_helpers import kill_writer, stop, wait_for, writer_in_process
from helpers import CHILD_CWD, child_env

#: Worker program for these tests: every task appends "event id attempt time"
#: lines to the log, so a test sees each attempt and when it ran.
APP = r'''
import os, sys, time
import engine
from engine import Backoff, Retry

db, log, procs = sys.argv[1], sys.argv[2], int(sys.argv[3])
tuning = eval(sys.argv[4]) if len(sys.argv) > 4 else {}
q = engine.Queue(db, **tuning)

def _log(event, i):
    job = engine.current_job()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"{event} {i} {job.attempt} {time.time():.6f}\n".encode())
    os.close(fd)

@q.task(name="l.square")
def square(i):
    _log("run", i)
    return {"i": i, "square": i * i}

@q.task(name="l.fail", max_attempts=2)
def fail(i):
    _log("run", i)
    raise ValueError(f"bad input {i}")

@q.task(name="l.flaky", max_attempts=4)
def flaky(i, fails):
    _log("run", i)
    if engine.current_job().attempt <= fails:
        raise RuntimeError(f"flaky {i}")
    return engine.current_job().attempt

@q.task(name="l.const", max_attempts=3, backoff=Backoff.constant(0.4))
def const(i):
    _log("run", i)
    raise RuntimeError("again")

@q.task(name="l.linear", max_attempts=3, backoff=Backoff.linear(0.3, cap=10))
def linear(i):
    _log("run", i)
    raise RuntimeError("again")

@q.task(name="l.expo", max_attempts=4, backoff=Backoff.exponential(0.2, cap=0.5))
def expo(i):
    _log("run", i)
    raise RuntimeError("again")

@q.task(name="l.retry", max_attempts=3)
def retry(i, delay):
    _log("run", i)
    if engine.current_job().attempt == 1:
        raise Retry(delay=delay)
    return "second"

@q.task(name="l.slow", max_attempts=2, timeout=1.0)
def slow(i, first_sleep):
    _log("run", i)
    attempt = engine.current_job().attempt
    if attempt == 1:
        time.sleep(first_sleep)
    _log("end", i)
    return f"attempt {attempt}"

@q.task(name="l.watch")
def watch(i):
    _log("run", i)
    job = engine.current_job()
    job.progress(0.5)
    deadline = time.time() + 30
    while not job.cancelled and time.time() < deadline:
        time.sleep(0.02)
    _log("saw-cancel" if job.cancelled else "no-cancel", i)
    return "finished anyway"

@q.task(name="l.when")
def when(i):
    _log("run", i)

@q.task(name="l.grouped")
def grouped(i, secs):
    _log("run", i)
    time.sleep(secs)
    _log("end", i)

@q.task(name="l.backoff30", max_attempts=2, backoff=Backoff.constant(30))
def backoff30(i):
    _log("run", i)
    raise RuntimeError("try again in 30 s")

@q.task(name="l.unstorable")
def unstorable(i):
    _log("run", i)
    return object()

@q.task(name="l.huge")
def huge(i):
    _log("run", i)
    return "x" * (5 << 20)

print("ready", flush=True)
sys.exit(q.run_workers(processes=procs, grace=5.0))
'''


def start(db: str, log: str, processes: int = 1, tuning: Dict = None) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", APP, db, log, str(processes), repr(tuning or {})],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=CHILD_CWD)
    line = p.stdout.readline()  # type: ignore[union-attr]
    assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")  # type: ignore
    return p


def events(log: str, event: str = "run", i: int = None) -> List[tuple]:
    """(id, attempt, time) of each logged `event`, in log order."""
    if not os.path.exists(log):
        return []
    out = []
    with open(log) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4 and parts[0] == event and (i is None or int(parts[1]) == i):
                out.append((int(parts[1]), int(parts[2]), float(parts[3])))
    return out


@pytest.fixture
def log(tmp_path) -> str:
    return str(tmp_path / "log")


def test_backoff_delays_follow_their_kind():
    assert Backoff.constant(2.0).delay(1) == Backoff.constant(2.0).delay(5) == 2.0
    assert [Backoff.linear(0.5, cap=1.2).delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.2]
    assert [Backoff.exponential(0.25).delay(n) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1.0, 2.0]
    assert Backoff.exponential(1.0, cap=60).delay(200) == 60.0
    jittered = [Backoff.exponential(1.0, cap=8, jitter=True).delay(4) for _ in range(400)]
    assert all(0 <= d <= 8.0 for d in jittered)
    assert max(jittered) - min(jittered) > 4.0, "full jitter spreads over [0, delay]"
    assert Backoff.none().delay(3) == 0.0
    for bad in (-1, float("nan"), "1", 10**9):
        with pytest.raises(errors.InvalidArgument, match="backoff"):
            Backoff.constant(bad)


def test_result_is_stored_and_awaited(db, log):
    with engine.Queue(db) as q:
        w = start(db, log, processes=2)
        try:
            ids = [q.submit("l.square", args=(i,)) for i in range(20)]
            assert [q.result(t, timeout=30) for t in ids] == [{"i": i, "square": i * i} for i in range(20)]
            assert q.get(ids[3]).result == {"i": 3, "square": 9}
            with pytest.raises(errors.WaitTimeout):
                q.result(q.submit("l.when", args=(0,), delay=60), timeout=0.3)
            with pytest.raises(errors.TaskNotFound):
                q.result(10**12, timeout=1)
            bad = q.submit("l.unstorable", args=(1,))
            with pytest.raises(errors.TaskFailed, match="NotSerializable") as e:
                q.result(bad, timeout=30)
            assert e.value.state == "dead" and "object" in e.value.error["message"]
            big = q.submit("l.huge", args=(2,))
            with pytest.raises(errors.TaskFailed, match="PayloadTooLarge"):
                q.result(big, timeout=30)
            assert q.result(q.submit("l.square", args=(5,)), timeout=30)["square"] == 25, "the worker lives"
        finally:
            assert stop(w) == 0


def test_result_waits_without_polling_the_database(db, log, monkeypatch):
    """q.result sleeps on the segment's finish event; it reads SQLite only when
    the task has ended (plus a slow safety check)."""
    with engine.Queue(db) as q:
        tid = q.submit("l.square", args=(7,))
        reads = []
        real = q.reader.ending
        monkeypatch.setattr(q.reader, "ending", lambda t: reads.append(t) or real(t))
        w = start(db, log)
        try:
            time.sleep(0.5)  # the task may well be done already; either way:
            assert q.result(tid, timeout=30)["square"] == 49
        finally:
            assert stop(w) == 0
        assert len(reads) <= 3


def test_failure_records_error_then_dead_letter_then_retry_dead(db, log, tmp_path):
    with engine.Queue(db) as q:
        w = start(db, log)
        try:
            tid = q.submit("l.fail", args=(5,))
            with pytest.raises(errors.TaskFailed) as e:
                q.result(tid, timeout=30)
            assert e.value.state == "dead"
            assert e.value.error["type"] == "ValueError" and e.value.error["message"] == "bad input 5"
            assert "in fail" in e.value.error["traceback"]  # the frame that raised
            info = q.get(tid)
            assert (info.state, info.attempts, info.max_attempts) == ("dead", 2, 2)
            assert info.error["message"] == "bad input 5"
            assert [d.id for d in q.dead_letters()] == [tid]
            assert [a for _, a, _ in events(log, i=5)] == [1, 2]

            # Put back with fresh attempts: two more runs, attempts keep counting up.
            assert q.retry_dead(tid) == [tid]
            wait_for(lambda: len(events(log, i=5)) == 4, what="two more attempts")
            wait_for(lambda: q.get(tid).state == "dead", what="dead again")
            assert [a for _, a, _ in events(log, i=5)] == [1, 2, 3, 4]
            assert q.get(tid).max_attempts == 4
            assert q.retry_dead(q.submit("l.square", args=(1,))) == [], "only dead tasks come back"

            # The CLI does the same for every dead task.
            out = subprocess.run([sys.executable, "-m", "engine", "retry", db, "--all"], capture_output=True,
                                 text=True, env=child_env(), cwd=CHILD_CWD, timeout=120)
            assert out.returncode == 0, out.stderr
            assert "1 task" in out.stdout
            wait_for(lambda: len(events(log, i=5)) == 6, what="the CLI's retry ran")
        finally:
            assert stop(w) == 0


def test_a_task_that_fails_then_succeeds_completes_with_its_result(db, log):
    with engine.Queue(db) as q:
        w = start(db, log)
        try:
            tid = q.submit("l.flaky", args=(1, 2))
            assert q.result(tid, timeout=30) == 3
            assert q.get(tid).attempts == 3
            assert q.get(tid).error["message"] == "flaky 1", "the last failed attempt's error is kept"
        finally:
            assert stop(w) == 0


@pytest.mark.parametrize("name,gaps", [
    ("l.const", [0.4, 0.4]),
    ("l.linear", [0.3, 0.6]),
    ("l.expo", [0.2, 0.4, 0.5]),
])
def test_backoff_spaces_the_attempts(db, log, name, gaps):
    with engine.Queue(db) as q:
        w = start(db, log)
        try:
            tid = q.submit(name, args=(1,))
            wait_for(lambda: q.get(tid).state == "dead", what="all attempts used")
        finally:
            assert stop(w) == 0
    times = [t for _, _, t in events(log, i=1)]
    assert len(times) == len(gaps) + 1
    for k, want in enumerate(gaps):
        got = times[k + 1] - times[k]
        assert want - 0.02 <= got <= want + 1.0, (k, got, want)


def test_retry_exception_asks_for_a_delay(db, log):
    with engine.Queue(db) as q:
        w = start(db, log)
        try:
            tid = q.submit("l.retry", args=(1, 0.8))
            assert q.result(tid, timeout=30) == "second"
        finally:
            assert stop(w) == 0
    (_, a1, t1), (_, a2, t2) = events(log, i=1)
    assert (a1, a2) == (1, 2)
    assert 0.78 <= t2 - t1 <= 2.0


def test_deadline_reruns_a_slow_attempt_and_only_the_fenced_outcome_counts(db, log):
    """The first attempt sleeps past its 1 s timeout: the deadline fails it,
    a second worker runs attempt 2, and attempt 1's late result is discarded."""
    with engine.Queue(db) as q:
        w = start(db, log, processes=2)
        try:
            tid = q.submit("l.slow", args=(1, 3.0))
            assert q.result(tid, timeout=30) == "attempt 2"
            wait_for(lambda: len(events(log, "end", 1)) == 2, what="the slow attempt ended too")
            time.sleep(0.5)  # its late result has reached the writer
            info = q.get(tid)
            assert (info.state, info.attempts, info.result) == ("completed", 2, "attempt 2")
            assert info.error["type"] == "TimeoutError"
            assert q.stats()["fenced"] >= 1
            assert q.result(tid, timeout=1) == "attempt 2"
        finally:
            assert stop(w) == 0
    runs = events(log, i=1)
    assert [a for _, a, _ in runs] == [1, 2]
    assert 0.9 <= runs[1][2] - runs[0][2] <= 3.0, "attempt 2 started once the deadline passed"


def test_deadline_counts_from_each_jobs_start_and_stops_when_it_finishes(db, log):
    """One worker claims 8 jobs of 0.3 s with a 1 s timeout in one batch and
    runs them one after another (2.4 s), holding their results until the
    batch ends: none times out, because each deadline starts when its job
    starts and stops once its outcome is sent."""
    with engine.Queue(db) as q:
        ids = [q.submit("l.slow", args=(i, 0.3)) for i in range(8)]
        w = start(db, log, processes=1)
        try:
            assert [q.result(t, timeout=30) for t in ids] == ["attempt 1"] * 8
        finally:
            assert stop(w) == 0
        assert [q.get(t).attempts for t in ids] == [1] * 8
    runs = events(log)
    assert sorted(i for i, _, _ in runs) == list(range(8)), "each ran once"
    assert runs[-1][2] - runs[0][2] >= 2.0, "they ran one after another, in one batch"


def test_late_completion_of_a_presumed_dead_worker_is_discarded(db):
    """A claim whose lease runs out goes back to pending; the next claim gets
    attempt 2, and the first holder's complete is refused."""
    with engine.Queue(db, lease=0.5, upkeep_interval=0.05) as q:
        tid = q.submit("l.square", args=(3,))
        (first,) = q.claim(max=1, timeout=5)
        assert first.attempt == 1
        time.sleep(1.2)  # no heartbeat: the lease runs out
        (second,) = q.claim(max=1, timeout=5)
        assert (second.id, second.attempt) == (tid, 2)
        assert first.cancelled
        assert first.complete({"late": True}) is False
        assert second.complete({"on": "time"}) is True
        assert q.result(tid, timeout=10) == {"on": "time"}
        assert q.get(tid).attempts == 2


def test_heartbeat_keeps_a_long_attempt_alive(db):
    with engine.Queue(db, lease=0.5, upkeep_interval=0.05) as q:
        tid = q.submit("l.square", args=(3,))
        (job,) = q.claim(max=1, timeout=5)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            assert job.heartbeat()
            time.sleep(0.15)
        assert q.claim(max=1, timeout=0.2) == [], "a renewed lease does not expire"
        assert job.complete(9) is True
        assert q.result(tid, timeout=10) == 9
        assert q.get(tid).attempts == 1


def test_lease_loss_with_no_attempts_left_is_dead(db):
    """A task that takes its worker down every time ends dead instead of
    looping for ever."""
    with engine.Queue(db, lease=0.3, upkeep_interval=0.05) as q:
        tid = q.submit("l.square", args=(3,), max_attempts=2)
        for attempt in (1, 2):
            (job,) = q.claim(max=1, timeout=5)
            assert job.attempt == attempt
            time.sleep(0.8)
        wait_for(lambda: q.get(tid).state == "dead", timeout=10, what="dead after two lost leases")
        assert q.get(tid).error["type"] == "LeaseExpired"


def test_delay_and_run_at_hold_a_task_back(db, log):
    with engine.Queue(db) as q:
        w = start(db, log)
        try:
            t0 = time.time()
            a = q.submit("l.when", args=(1,), delay=1.0)
            b = q.submit("l.when", args=(2,), run_at=t0 + 1.5)
            c = q.submit("l.when", args=(3,))
            assert q.get(a).state == "delayed" and q.get(b).state == "delayed"
            assert abs(q.get(b).run_at - (t0 + 1.5)) < 0.01
            for t in (a, b, c):
                q.result(t, timeout=30)
        finally:
            assert stop(w) == 0
    ran = {i: t for i, _, t in events(log)}
    assert ran[1] >= t0 + 1.0 and ran[2] >= t0 + 1.5
    assert ran[3] < ran[1], "a task without delay does not wait behind delayed ones"
    with pytest.raises(errors.InvalidArgument, match="not both"):
        engine.Queue.submit(q, "l.when", delay=1, run_at=1)


def test_cancel_pending_and_running(db, log):
    with engine.Queue(db) as q:
        pending = q.submit("l.when", args=(1,), delay=0.5)
        assert q.cancel(pending) is True
        assert q.cancel(pending) is False, "already ended"
        w = start(db, log)
        try:
            running = q.submit("l.watch", args=(2,))
            wait_for(lambda: events(log, i=2), what="the watcher started")
            wait_for(lambda: q.get(running).progress == 0.5, what="its progress is visible")
            assert q.stats()["progress"] == {running: 0.5}
            cli = subprocess.run([sys.executable, "-m", "engine", "stats", db], capture_output=True, text=True,
                                 env=child_env(), cwd=CHILD_CWD, timeout=60)
            assert f"task {running} running, 50% done" in cli.stdout, cli.stdout + cli.stderr
            assert q.cancel(running) is True
            wait_for(lambda: events(log, "saw-cancel", 2), what="the running task saw the cancel")
            with pytest.raises(errors.TaskFailed, match="cancelled"):
                q.result(running, timeout=10)
            time.sleep(1.0)  # the late outcome arrives and is ignored
            assert q.get(running).state == "cancelled"
            assert q.get(pending).state == "cancelled"
        finally:
            assert stop(w) == 0
        assert events(log, i=1) == [], "a cancelled pending task never runs"


def test_lifecycle_state_survives_a_reboot(db, log):
    """kill -9 every process and delete the segment: dead tasks stay dead with
    their error, results stay readable, a backoff delay is still honoured, a
    waiting task still waits and then runs, group limits hold."""
    with engine.Queue(db) as q:
        q.set_group_limit("g1", 3)
        w = start(db, log)
        dead = q.submit("l.fail", args=(1,))
        done = q.submit("l.square", args=(4,))
        backed = q.submit("l.backoff30", args=(5,))
        with pytest.raises(errors.TaskFailed):
            q.result(dead, timeout=30)
        assert q.result(done, timeout=30)["square"] == 16
        later = q.submit("l.when", args=(2,), delay=30)
        parent = q.submit("l.when", args=(30,), delay=2.0)
        child = q.submit("l.when", args=(40,), depends_on=[parent])
        wait_for(lambda: q.get(backed).state == "delayed", what="the first attempt failed")
        time.sleep(0.3)  # flushed
        w.send_signal(signal.SIGKILL)
        w.wait()
        for proc in __import__("psutil").Process().children(recursive=True):
            proc.kill()
        kill_writer(db)
    shm.Segment.unlink(__import__("engine.paths", fromlist=["x"]).segment_name(db))
    with engine.Queue(db) as q:
        assert q.get(dead).state == "dead" and q.get(dead).error["message"] == "bad input 1"
        assert q.result(done, timeout=5)["square"] == 16
        assert q.get(later).state == "delayed"
        info = q.get(backed)
        assert (info.state, info.attempts) == ("delayed", 1) and info.run_at > time.time() + 20
        assert q.get(child).state == "waiting"
        assert [d.id for d in q.dead_letters()] == [dead]
        assert q.seg.group_info(1)["limit"] == 3
        assert q.verify() == 4  # later, backed, parent (delayed) and child (waiting)
        w = start(db, log)
        try:
            q.result(child, timeout=30)
        finally:
            assert stop(w) == 0
        assert [i for i, _, _ in events(log) if i in (30, 40)] == [30, 40]


def test_graceful_stop_flushes_reported_outcomes(db, log):
    """SIGTERM while a task runs: it finishes, its result is stored, and the
    next open after everything closed sees it completed."""
    with engine.Queue(db) as q:
        w = start(db, log)
        tid = q.submit("l.grouped", args=(1, 1.0))
        wait_for(lambda: events(log, i=1), what="the task started")
        assert stop(w) == 0
        assert events(log, "end", 1), "the running task finished within the grace period"
    wait_for(lambda: not paths.writer_alive(db), timeout=30, what="the writer exited")
    with engine.Queue(db) as q:
        assert q.get(tid).state == "completed"


@contextlib.contextmanager
def _failed_before_defined(q: engine.Queue, db: str, log: str, i: int) -> Iterator[int]:
    """Submit l.fail(i) before any process defined l.fail (its limits stay
    unset on disk), start a worker and wait until the task has failed for
    good; yields its id, and stops the worker on the way out."""
    tid = q.submit("l.fail", args=(i,))
    assert q.reader.task(tid)["max_attempts"] == 0
    w = start(db, log)
    try:
        with pytest.raises(errors.TaskFailed):
            q.result(tid, timeout=30)
        yield tid
    finally:
        assert stop(w) == 0


def test_workers_register_definitions_for_submits_by_name(db, log):
    """A process that submits by name without the task defined gets the
    limits that the workers' definition sets; before any worker defined it,
    the claiming worker applies its own."""
    with engine.Queue(db) as q, _failed_before_defined(q, db, log, 1):
        assert len(events(log, i=1)) == 2, "the worker's max_attempts=2 applied at claim"
        wait_for(lambda: "l.slow" in dict(q.reader.conn.execute("SELECT name, 1 FROM definitions")),
                 what="the workers registered their definitions")
        late = q.submit("l.slow", args=(2, 0.0))
        rec = q.reader.task(late)
        assert (rec["max_attempts"], rec["timeout_ms"]) == (2, 1000)
        assert q.reader.task(q.submit("l.expo", args=(3,)))["backoff"] == Backoff.exponential(0.2, 0.5).packed()
        assert q.reader.task(q.submit("l.fail", args=(4,), max_attempts=5))["max_attempts"] == 5, \
            "an explicit limit wins over the definition"


def test_a_task_with_unset_limits_put_back_from_dead_gets_its_fresh_attempts(db, log):
    """Its limit, unset on disk, comes from the claiming worker's definition
    and counts from the attempts it used before it was put back."""
    with engine.Queue(db) as q, _failed_before_defined(q, db, log, 6) as tid:
        assert [a for _, a, _ in events(log, i=6)] == [1, 2]
        assert q.retry_dead(tid) == [tid]
        wait_for(lambda: q.get(tid).state == "dead" and len(events(log, i=6)) >= 4, what="dead again")
        time.sleep(0.3)  # a wrong limit would show as fewer runs, not more; let any extra one show too
        assert [a for _, a, _ in events(log, i=6)] == [1, 2, 3, 4]
        assert q.get(tid).max_attempts == 4


def test_a_claimed_job_put_back_from_dead_shows_the_limit_its_attempts_count_to(db):
    """A task with max_attempts=2 used both, was put back, and runs attempt
    3 of 4: job.max_attempts says 4 (as the segment does), not 2."""
    with engine.Queue(db) as q:
        tid = q.submit("l.limited", args=(1,), max_attempts=2)
        for attempt in (1, 2):
            [job] = q.claim(1, timeout=5)
            assert (job.attempt, job.max_attempts) == (attempt, 2)
            assert job.fail(RuntimeError("no"), retry=True)
        wait_for(lambda: q.get(tid).state == "dead", what="dead")
        assert q.retry_dead(tid) == [tid]
        [job] = q.claim(1, timeout=5)
        assert (job.attempt, job.max_attempts, q.seg.get(tid).max_attempts) == (3, 4, 4)
        assert job.complete()


def test_one_claim_adopts_each_name_s_limits_in_one_call_per_policy(db):
    """Tasks submitted by name before anyone defined them take the claiming
    worker's limits, per name, whatever the mix in one claim."""
    with engine.Queue(db) as early:
        ids = {name: [early.submit(name, args=(k,)) for k in range(10)] for name in ("a.three", "a.five")}
    q = engine.Queue(db)
    try:
        q.task(name="a.three", max_attempts=3, timeout=7.0)(lambda k: k)
        q.task(name="a.five", max_attempts=5)(lambda k: k)
        jobs = q.claim(max=20, timeout=5)
        assert len(jobs) == 20
        for name, want in (("a.three", (3, 7000)), ("a.five", (5, 0))):
            got = {(q.seg.get(t).max_attempts, q.seg.get(t).timeout_ms) for t in ids[name]}
            assert got == {want}, name
        assert {j.max_attempts for j in jobs if j.name == "a.three"} == {3}
    finally:
        q.close()


def test_adopt_batch_skips_fenced_tickets(seg):
    t = seg.tasks(3)
    for k in range(3):
        shm.fill_task(t[k], 100 + k, seq=k)
    seg.push_batch(t, 3)
    buf, n = seg.pop_batch(3, shm.now_us() + 10**7)
    assert n == 3
    seg.finish(shm.Ticket(buf[1].id, buf[1].slot, buf[1].attempt))  # no longer running
    out = shm.Segment.statuses(3)
    assert seg.adopt_batch(buf, 3, 4, 0, 0, out) == 2
    assert list(out) == [0, shm.lib.HR_E_STALE, 0]
    assert seg.get(100).max_attempts == 4 and seg.get(102).max_attempts == 4


def _max_overlap(spans: List[tuple]) -> int:
    points = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = most = 0
    for _, d in points:
        now += d
        most = max(most, now)
    return most


def test_group_limit_holds_across_workers_and_other_groups_flow(db, log):
    """Limit 2 with 4 worker processes: never more than 2 of the group run at
    once, and tasks of another group, queued behind them, are not held up."""
    with engine.Queue(db) as q:
        q.set_group_limit("s3-east", 2)
        limited = [q.submit("l.grouped", args=(i, 0.3), group="s3-east") for i in range(10)]
        free = [q.submit("l.grouped", args=(100 + i, 0.05), group="other") for i in range(10)]
        w = start(db, log, processes=4)
        try:
            for t in limited + free:
                q.result(t, timeout=60)
        finally:
            assert stop(w) == 0
    starts = {i: t for i, _, t in events(log, "run")}
    ends = {i: t for i, _, t in events(log, "end")}
    spans = [(starts[i], ends[i]) for i in range(10)]
    assert _max_overlap(spans) == 2, "the limit is used and never exceeded"
    assert max(ends[100 + i] for i in range(10)) < max(ends[i] for i in range(10)) - 0.5, \
        "the other group finished while the limited one still ran"
    assert _max_overlap([(starts[i], ends[i]) for i in list(range(10)) + list(range(100, 110))]) >= 3


@pytest.mark.parametrize("limit_first", [True, False], ids=["limit-then-submit", "submit-then-limit"])
def test_a_saturated_group_beyond_capacity_does_not_hold_back_other_tasks(db, log, limit_first):
    """A limited group's backlog larger than the segment: its surplus waits
    on disk, so tasks submitted after it (spilled at first) still flow while
    the group runs one at a time.  Also when the limit comes after the
    group's tasks already fill the segment."""
    with engine.Queue(db, capacity=32) as q:
        if limit_first:
            q.set_group_limit("slow-api", 1)
        limited = [q.submit("l.grouped", args=(i, 0.1), group="slow-api") for i in range(60)]
        q.set_group_limit("slow-api", 1)
        free = [q.submit("l.grouped", args=(1000 + i, 0), group=None if i % 2 else "fast") for i in range(120)]
        w = start(db, log, processes=2, tuning={"capacity": 32})
        try:
            for t in free:
                q.result(t, timeout=60)
            done_limited = sum(1 for t in limited if q.get(t).state == "completed")
            for t in limited:
                q.result(t, timeout=120)
        finally:
            assert stop(w) == 0
        assert q.stats()["counts"]["completed"] == 180
    spans = [(s, e) for (i, _, s), (_, _, e) in zip(sorted(events(log, "run")), sorted(events(log, "end"))) if i < 1000]
    assert _max_overlap(spans) == 1
    # Run one at a time, the group takes 6 s; the others need a fraction of a second.
    assert done_limited < 12, f"the other tasks waited for {done_limited} of the group's 60 to finish"


def test_cancel_a_whole_group(db):
    with engine.Queue(db) as q:
        ids = [q.submit("l.when", args=(i,), group="batch-7", delay=30) for i in range(5)]
        other = q.submit("l.when", args=(9,), group="batch-8", delay=30)
        assert q.cancel_group("batch-7") == 5
        assert {q.get(t).state for t in ids} == {"cancelled"}
        assert q.get(other).state == "delayed"
        assert q.cancel_group("batch-7") == 0
        with pytest.raises(errors.InvalidArgument, match="group"):
            q.submit("l.when", args=(1,), group="")


def test_dependency_chain_of_50_and_fan_in_of_1000_complete_in_order(db, log):
    with engine.Queue(db) as q:
        chain = [q.submit("l.when", args=(0,))]
        for i in range(1, 50):
            chain.append(q.submit("l.when", args=(i,), depends_on=[chain[-1]]))
        parents = q.submit_batch([engine.Job("l.when", args=(1000 + i,)) for i in range(1000)]).inserted
        child = q.submit("l.when", args=(5000,), depends_on=parents)
        assert q.get(chain[1]).state == "waiting" and q.get(child).state == "waiting"
        assert q.stats()["counts"]["waiting"] == 50
        w = start(db, log, processes=2)
        try:
            q.result(chain[-1], timeout=120)
            q.result(child, timeout=120)
        finally:
            assert stop(w) == 0
    ran = {i: t for i, _, t in events(log)}
    assert [i for i, _, _ in sorted(events(log), key=lambda e: e[2]) if i < 50] == list(range(50))
    assert ran[5000] >= max(ran[1000 + i] for i in range(1000))
    assert len(events(log)) == 50 + 1000 + 1, "every task ran once"


def test_a_failed_dependency_cancels_its_dependents_transitively(db, log):
    with engine.Queue(db) as q:
        parent = q.submit("l.fail", args=(1,))
        child = q.submit("l.when", args=(2,), depends_on=[parent])
        grandchild = q.submit("l.when", args=(3,), depends_on=[child])
        bystander = q.submit("l.when", args=(4,))
        w = start(db, log)
        try:
            with pytest.raises(errors.TaskFailed, match="dead"):
                q.result(parent, timeout=30)
            for t in (child, grandchild):
                with pytest.raises(errors.TaskFailed, match="cancelled"):
                    q.result(t, timeout=30)
            q.result(bystander, timeout=30)
            # A task that depends on a dead one is cancelled at once.
            late = q.submit("l.when", args=(5,), depends_on=[parent])
            assert q.get(late).state == "cancelled"
            # ... and on a completed one, it runs at once.
            assert q.result(q.submit("l.when", args=(6,), depends_on=[bystander]), timeout=30) is None
        finally:
            assert stop(w) == 0
    assert {i for i, _, _ in events(log)} == {1, 4, 6}


def test_cancelling_a_waiting_task_cancels_what_waits_on_it(db):
    with engine.Queue(db) as q:
        root = q.submit("l.when", args=(1,), delay=60)
        mid = q.submit("l.when", args=(2,), depends_on=[root])
        leaf = q.submit("l.when", args=(3,), depends_on=[mid])
        assert q.cancel(mid) is True
        assert (q.get(mid).state, q.get(leaf).state, q.get(root).state) == ("cancelled", "cancelled", "delayed")
        assert q.stats()["counts"]["waiting"] == 0


def test_depends_on_must_name_existing_tasks(db):
    with engine.Queue(db) as q:
        ok = q.submit("l.when", args=(1,))
        with pytest.raises(errors.InvalidArgument, match="does not exist"):
            q.submit("l.when", args=(2,), depends_on=[ok + 10**9])
        with pytest.raises(errors.InvalidArgument, match="task ids"):
            q.submit("l.when", args=(2,), depends_on=["x"])
        out = q.submit_batch([engine.Job("l.when", args=(3,), depends_on=[ok]),
                              engine.Job("l.when", args=(4,), depends_on=[ok + 10**9]),
                              engine.Job("l.when", args=(5,))])
        assert [o.kind for o in out.outcomes] == ["inserted", "rejected", "inserted"]
        assert "does not exist" in str(out.outcomes[1].error)


def test_tags_find_count_and_cancel(db, log):
    with engine.Queue(db) as q:
        for i in range(30):
            q.submit("l.when", args=(i,), tags={"bucket": f"b{i % 3}", "kind": "thumb" if i < 15 else "full"},
                     delay=60 if i % 2 else None)
        assert q.count(tags={"bucket": "b1"}) == 10
        assert q.count(tags={"bucket": "b1", "kind": "thumb"}) == 5
        assert q.count(tags={"bucket": "b1"}, state="delayed") == 5
        assert len(q.find(tags={"kind": "full"}, limit=4)) == 4
        assert q.cancel_tagged({"bucket": "b2"}) == 10
        assert q.count(tags={"bucket": "b2"}, state="cancelled") == 10
        assert q.count(tags={"bucket": "nope"}) == 0
        with pytest.raises(errors.InvalidArgument, match="at most 32"):
            q.submit("l.when", args=(1,), tags={f"k{i}": "v" for i in range(33)})
        with pytest.raises(errors.InvalidArgument, match="tag value"):
            q.submit("l.when", args=(1,), tags={"k": 5})
        w = start(db, log)
        try:
            wait_for(lambda: q.count(tags={"bucket": "b0"}, state="completed") == 5, what="the undelayed b0 ran")
        finally:
            assert stop(w) == 0


def test_a_state_count_never_misses_a_flush_that_lands_while_it_reads(db, monkeypatch):
    """find/count by state read each task's state from the segment, else
    from the database.  A flush that commits the cancellations and frees
    their slots between the two reads must not make them look pending: the
    segment is read first (a slot is freed only after its outcome is
    committed), so the database read after it has the outcome."""
    with engine.Queue(db, flush_interval=0.5) as q:
        ids = [q.submit("l.when", args=(i,), tags={"bucket": "b"}) for i in range(10)]
        real = q.reader.last_states

        def then_the_flush_lands(part):
            out = real(part)
            wait_for(lambda: all(q.seg.get(t) is None for t in ids), what="the flush freed the cancelled slots")
            return out
        assert q.cancel_tagged({"bucket": "b"}) == 10
        assert all(q.seg.get(t) is not None for t in ids), "the flush came before the count could race it"
        monkeypatch.setattr(q.reader, "last_states", then_the_flush_lands)
        assert q.count(tags={"bucket": "b"}, state="cancelled") == 10


def test_cron_expressions_give_their_next_time():
    from engine.cron import Cron
    t = calendar.timegm((2026, 11, 23, 16, 58, 30))  # a Monday

    def nxt(expr: str) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(Cron(expr).next_after(t)))
    assert nxt("*/5 * * * *") == "2026-11-23 17:00"
    assert nxt("0 0 * * *") == "2026-11-24 00:00"
    assert nxt("0 12 * * 1") == "2026-11-30 12:00"
    assert nxt("0 0 29 2 *") == "2028-02-29 00:00"
    assert nxt("15 10 * * 1-5") == "2026-11-24 10:15"
    assert nxt("0 0 1,15 * 0") == "2026-11-29 00:00", "either day field matches when both are restricted"
    for bad in ("* * * *", "61 * * * *", "*/0 * * * *", "a * * * *", "0 0 31 2 *"):
        with pytest.raises(errors.InvalidArgument):
            Cron(bad).next_after(t)


PERIODIC_APP = r'''
import os, sys, time
from datetime import timedelta
import engine

db, log = sys.argv[1], sys.argv[2]
q = engine.Queue(db)

@q.periodic(every=timedelta(seconds=1), name="p.tick")
def tick():
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"tick {os.getpid()} {time.time():.6f}\n".encode())
    os.close(fd)

@q.periodic(cron="0 0 1 1 *", name="p.yearly")
def yearly():
    raise AssertionError("not due for a long time")

print("ready", flush=True)
sys.exit(q.run_workers(processes=2, grace=5.0))
'''


def test_periodic_task_runs_once_per_tick_with_two_workers(db, log):
    with engine.Queue(db) as q:
        p = subprocess.Popen([sys.executable, "-c", PERIODIC_APP, db, log], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env(), cwd=CHILD_CWD)
        assert p.stdout.readline().strip() == "ready"
        wait_for(lambda: os.path.exists(log), timeout=30, what="the first tick")
        t0 = time.time()
        time.sleep(5.0)
        t1 = time.time()
        assert stop(p) == 0
        # With no process defining it, the schedule stops submitting runs.
        def runs() -> int:
            return q.reader.conn.execute("SELECT count(*) FROM tasks WHERE name = 'p.tick'").fetchall()[0][0]
        before = runs()
        time.sleep(2.5)
        assert runs() <= before + 1, "a periodic task nobody defines any more kept firing"
        with open(log) as f:
            ticks = [float(line.split()[2]) for line in f]
        in_window = [t for t in ticks if t0 <= t < t1]
        assert 4 <= len(in_window) <= 6, in_window
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        assert min(gaps) > 0.5, "never two runs for one tick"
        yearly = q.reader.conn.execute("SELECT next_at FROM definitions WHERE name = 'p.yearly'").fetchall()
        assert time.gmtime(yearly[0][0] / 1e6)[1:3] == (1, 1)


def test_retention_purges_finished_tasks_in_bulk_and_keeps_live_ones(db, log):
    from datetime import timedelta
    with engine.Queue(db, retention=timedelta(seconds=1), purge_batch=500, purge_interval=0.05) as q:
        live = q.submit("l.when", args=(-1,), delay=60)
        done = q.submit_batch([engine.Job("l.when", args=(i,)) for i in range(3000)]).inserted
        dead = q.submit("l.fail", args=(7,))
        w = start(db, log, processes=2)
        try:
            q.result(done[-1], timeout=60)
            with pytest.raises(errors.TaskFailed):
                q.result(dead, timeout=60)
            wait_for(lambda: q.reader.conn.execute("SELECT count(*) FROM tasks").fetchall()[0][0] == 1,
                     timeout=60, what="every finished task purged")
            # While it purges, submits keep going.
            assert q.result(q.submit("l.square", args=(3,)), timeout=30)["square"] == 9
        finally:
            assert stop(w) == 0
        assert q.get(done[0]) is None and q.get(dead) is None
        assert q.get(live).state == "delayed", "a live task is never purged"
        assert q.reader.counters()["purged"] >= 3001
        wait_for(lambda: q.reader.conn.execute("SELECT count(*) FROM events").fetchall()[0][0] <= 3,
                 timeout=30, what="old submit events purged too")
        for table in ("payloads", "outcomes", "results"):
            ids = {r[0] for r in q.reader.conn.execute(f"SELECT id FROM {table}")}
            assert ids <= {live, *[r[0] for r in q.reader.conn.execute("SELECT id FROM tasks")]}, table


def _complete_and_flush(q: engine.Queue, iw: Any, n: int) -> List[int]:
    """Submit and complete `n` tasks, wait until the in-process writer `iw`
    flushed every outcome, then pause it; returns their ids."""
    ids = q.submit_batch([engine.Job("l.when", args=(i,)) for i in range(n)]).inserted
    done = 0
    while done < len(ids):
        for job in q.claim(64, timeout=5):
            assert job.complete()
            done += 1
    wait_for(lambda: all(iw.w.seg.get(tid) is None for tid in ids), what="every outcome flushed")
    iw.pause()
    return ids


def test_purge_by_age_walks_no_task_while_every_outcome_is_younger_than_the_retention(db, monkeypatch):
    """Before a round by age, the oldest outcome tells whether any task can
    be old enough: while none can, purge passes walk no task, even with
    tasks ending all the time (the round never ended at a steady stream)."""
    from engine import writer

    with writer_in_process(db, upkeep=False, retention=60, purge_batch=50) as iw, engine.Queue(db) as q:
        w = iw.w
        walks = []
        real = w.store.finished_after
        monkeypatch.setattr(w.store, "finished_after", lambda *a: walks.append(a) or real(*a))
        assert w.purge() == 0 and walks == [], "no outcome yet: nothing to walk"
        ids = _complete_and_flush(q, iw, 120)
        w.purge_idle_until = 0  # as a new writer starts
        assert [w.purge() for _ in range(3)] == [0, 0, 0] and walks == [], "every outcome is young"
        later = writer.now_us() + 61_000_000
        monkeypatch.setattr(writer, "now_us", lambda: later)
        assert sum(w.purge() for _ in range(4)) == 120 and walks, "past the retention, the round purges"
        assert q.reader.conn.execute("SELECT count(*) FROM tasks").fetchall()[0][0] == 0


def test_purge_by_age_rests_once_a_round_found_nothing_old_enough(db, monkeypatch):
    """A purge pass by age walks a batch of tasks; once a whole round found
    nothing old enough, passes look at nothing until the oldest ending it
    kept (or the round's start) is past the retention, then purge."""
    from engine import writer

    with writer_in_process(db, upkeep=False, retention=60, purge_batch=50) as iw, engine.Queue(db) as q:
        w = iw.w
        ids = _complete_and_flush(q, iw, 120)
        walks = []
        real = w.store.finished_after
        monkeypatch.setattr(w.store, "finished_after", lambda *a: walks.append(a) or real(*a))
        # An old outcome of a task that ended since (a week-long attempt, say): the round must walk.
        monkeypatch.setattr(w.store, "oldest_outcome_at", lambda: 1)
        w.purge_idle_until = 0
        assert [w.purge() for _ in range(3)] == [0, 0, 0]  # a round: 50 + 50 + 20 tasks, all young
        assert [a[0] for a in walks] == [0, ids[49], ids[99]]
        assert [w.purge() for _ in range(5)] == [0] * 5 and len(walks) == 3, "walked again too soon"
        later = writer.now_us() + 61_000_000
        monkeypatch.setattr(writer, "now_us", lambda: later)

        def full(ids):
            raise apsw.FullError("database or disk is full")
        monkeypatch.setattr(w.store, "purge", full)
        with pytest.raises(apsw.FullError):
            w.purge()  # the first 50 are old enough, and the disk refuses
        monkeypatch.undo()
        monkeypatch.setattr(writer, "now_us", lambda: later)
        # The round goes on, then the next one takes the 50 the disk refused (it must not rest).
        assert sum(w.purge() for _ in range(4)) == 120
        assert q.reader.conn.execute("SELECT count(*) FROM tasks").fetchall()[0][0] == 0
        assert q.reader.conn.execute("SELECT count(*) FROM events").fetchall()[0][0] == 0


def _run_and_purge_down_to(q: engine.Queue, db: str, log: str, n: int, keep: int) -> List[int]:
    """Run `n` tasks through 2 workers; returns their ids once at most `keep` rows are left."""
    ids = q.submit_batch([engine.Job("l.when", args=(i,)) for i in range(n)]).inserted
    w = start(db, log, processes=2)
    try:
        q.result(ids[-1], timeout=60)
        wait_for(lambda: q.reader.conn.execute("SELECT count(*) FROM tasks").fetchall()[0][0] <= keep,
                 timeout=60, what=f"purged down to {keep}")
    finally:
        assert stop(w) == 0
    return ids


def test_retention_count_keeps_the_newest_finished_tasks(db, log):
    with engine.Queue(db, retention=0, retention_count=100, purge_batch=500, purge_interval=0.05) as q:
        ids = _run_and_purge_down_to(q, db, log, 1000, 100)
        kept = [r[0] for r in q.reader.conn.execute("SELECT id FROM tasks ORDER BY id")]
        assert len(kept) >= 90 and kept[-1] == ids[-1], "the oldest went first"


EVENTS_FOLLOWER = r'''
import json, sys
import engine
q = engine.Queue(sys.argv[1])
print("ready", flush=True)
for e in q.events(idle_timeout=3.0):
    print(json.dumps([e.kind, e.id, e.attempt, e.count]), flush=True)
'''


def test_another_process_follows_the_event_stream(db, log):
    with engine.Queue(db) as q:
        follower = subprocess.Popen([sys.executable, "-c", EVENTS_FOLLOWER, db], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=child_env(), cwd=CHILD_CWD)
        assert follower.stdout.readline().strip() == "ready"
        one = q.submit("l.square", args=(2,))
        batch = q.submit_batch([engine.Job("l.square", args=(i,)) for i in range(5)]).inserted
        bad = q.submit("l.const", args=(1,))  # fails 3 times, 0.4 s apart: each failure is flushed
        gone = q.submit("l.when", args=(1,), delay=60)
        q.cancel(gone)
        w = start(db, log)
        try:
            q.result(batch[-1], timeout=30)
            with pytest.raises(errors.TaskFailed):
                q.result(bad, timeout=30)
            q.result(one, timeout=30)
        finally:
            assert stop(w) == 0
        out, err = follower.communicate(timeout=60)
    seen = [tuple(__import__("json").loads(line)) for line in out.splitlines()]
    kinds = [k for k, *_ in seen]
    assert ("submitted", one, 0, 1) in seen
    assert ("batch_submitted", batch[0], 0, 5) in seen and kinds.count("batch_submitted") == 1
    assert {("completed", t) for t in [one, *batch]} <= {(k, i) for k, i, *_ in seen}
    assert ("dead", bad, 3, 1) in seen and ("cancelled", gone, 0, 1) in seen
    assert ("failed", bad, 1, 1) in seen and ("failed", bad, 2, 1) in seen
    # A resumed stream starts after the cursor.
    with engine.Queue(db) as q:
        evs = list(q.events(follow=False))
        assert len(evs) == len(seen)
        assert list(q.events(after=evs[-1].cursor, follow=False)) == []


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_an_outcome_never_comes_before_its_task_s_submit_event_when_a_read_stops_at_its_limit(db, monkeypatch,
                                                                                             limit):
    """Each read of Queue.events takes up to EVENTS_BATCH rows of each log
    (submit events, outcomes).  A task submitted after others but run first
    (a higher priority) ends while the submit log still holds events before
    its own: the outcome log must then stop where the submit log does."""
    from engine import api
    monkeypatch.setattr(api, "EVENTS_BATCH", limit)
    with writer_in_process(db, upkeep=False) as iw, engine.Queue(db) as q:
        low = [q.submit_batch([engine.Job("l.when", args=(i,))]).inserted[0] for i in range(3)]
        high = q.submit_batch([engine.Job("l.when", args=(9,), priority=9)]).inserted[0]
        jobs = q.claim(1, timeout=5)
        assert [j.id for j in jobs] == [high]
        assert jobs[0].complete()
        wait_for(lambda: q.reader.conn.execute("SELECT count(*) FROM outcomes").fetchall()[0][0] == 1,
                 what="the outcome written")
        iw.pause()
        evs = list(q.events(follow=False))
    kinds = [(e.kind, e.id) for e in evs]
    assert kinds.index(("completed", high)) > kinds.index(("submitted", high)), kinds
    assert {("submitted", t) for t in low + [high]} | {("completed", high)} == set(kinds), kinds


def test_stats_count_each_finished_task_once_while_workers_drain(db, log):
    """The database and the segment each hold part of the finished count; a
    flush moves tasks from one to the other.  stats never counts one twice
    (nor drops one): the completed count only grows and never passes the total."""
    n = 20000
    with engine.Queue(db) as q:
        q.submit_batch([engine.Job("l.when", args=(i,)) for i in range(n)])
        w = start(db, log, processes=2)
        seen = []
        try:
            while not seen or seen[-1] < n:
                seen.append(q.stats()["counts"]["completed"])
                assert seen[-1] <= n, seen[-5:]
                assert len(seen) < 10**6
        finally:
            assert stop(w) == 0
        assert all(a <= b for a, b in zip(seen, seen[1:])), "the count went back"
        assert len(set(seen)) > 5, "it was sampled while the drain ran"


def test_stats_waits_out_a_flush_the_segment_has_not_shown_yet(db, monkeypatch):
    """Between a flush's commit and the segment freeing its slots, the
    finished tasks are in both views; stats waits for them to agree even
    when the writer is slow to get there (descheduled, on a loaded machine)."""
    import threading

    with writer_in_process(db, upkeep=False) as iw, engine.Queue(db) as q:
        seg = iw.w.seg
        ids = q.submit_batch([engine.Job("l.when", args=(i,)) for i in range(50)]).inserted
        inside, real = threading.Event(), seg.advance_dirty

        def slow(n, epoch, flush_seq=0):
            if flush_seq and seg.info()["counts"]["completed"]:
                inside.set()
                time.sleep(0.4)
            return real(n, epoch, flush_seq)
        monkeypatch.setattr(seg, "advance_dirty", slow)
        done = 0
        while done < len(ids):
            for job in q.claim(64, timeout=5):
                assert job.complete()
                done += 1
        assert inside.wait(10), "no flush of finished tasks"
        s = q.stats()
        assert s["counts"]["completed"] == len(ids), s["counts"]
        monkeypatch.undo()


def test_a_bad_command_is_refused_and_the_writer_lives(db):
    with pytest.raises(errors.InvalidArgument, match="never matches"):
        engine.Queue.periodic(engine.Queue.__new__(engine.Queue), cron="0 0 30 2 *")
    with engine.Queue(db) as q:
        with pytest.raises(errors.SubmitFailed, match="never matches"):
            q._command("define", ([("x.never", 1, 0, 0, 0, "0 0 30 2 *", 0)],))
        assert paths.writer_alive(db)
        assert q.submit("l.when", args=(1,)) > 0


def test_a_dependency_counts_once_when_the_writer_dies_between_commit_and_advance(db, monkeypatch):
    """The flush that completes a parent commits, then the writer is killed
    before the segment shows it; the next writer flushes that completion
    again.  The child must still wait for its other parent."""
    with engine.Queue(db, lease=600.0) as q:
        p1 = q.submit("l.when", args=(1,))
        p2 = q.submit("l.when", args=(2,))
        child = q.submit("l.when", args=(3,), depends_on=[p1, p2])
        jobs = {j.id: j for j in q.claim(max=2, timeout=5)}
        assert set(jobs) == {p1, p2}
        kill_writer(db)
        # The next writer kills itself right after its second commit: the
        # first answers this sync, the second is the flush below.
        monkeypatch.setenv("HEADRACE_WRITER_FAULT", "committed:2")
        q._command("sync", ([],))
        monkeypatch.delenv("HEADRACE_WRITER_FAULT")
        assert q.seg.get(p1).state == shm.RUNNING
        q.seg.finish(shm.Ticket(p1, q.seg.get(p1).slot, q.seg.get(p1).attempt), shm.COMPLETED)
        wait_for(lambda: not paths.writer_alive(db), timeout=30, what="the writer killed after its commit")
        assert q.reader.conn.execute("SELECT count(*) FROM outcomes WHERE id = ? AND state = ?",
                                     (p1, shm.COMPLETED)).fetchall()[0][0] == 1, "the flush committed"
        q._command("sync", ([],))  # a healthy writer, which flushes p1's completion again
        wait_for(lambda: q.get(p1).state == "completed", timeout=30, what="p1 flushed")
        time.sleep(0.3)
        assert q.get(child).state == "waiting", "the child was released while p2 still runs"
        assert q.claim(max=1, timeout=0.3) == []
        q.seg.finish(shm.Ticket(p2, q.seg.get(p2).slot, q.seg.get(p2).attempt), shm.COMPLETED)
        (job,) = q.claim(max=1, timeout=10)
        assert job.id == child


def test_totals_survive_a_writer_crash_after_a_purge(db, log):
    with engine.Queue(db, retention=0, retention_count=5, purge_batch=500, purge_interval=0.05) as q:
        _run_and_purge_down_to(q, db, log, 40, 5)
        wait_for(lambda: q.stats()["counts"]["completed"] == 40, timeout=10, what="the totals written")
        kill_writer(db)  # the next writer recounts from the tables
        q._refresh()
        q._command("sync", ([],))  # answered once the new writer serves, its recount done
        assert q.stats()["counts"]["completed"] == 40
        assert q.stats()["submitted"] == 40


def test_resuming_events_from_any_cursor_skips_nothing(db):
    with engine.Queue(db) as q:
        for i in range(5):
            q.submit("l.when", args=(i,), delay=60)
        q.submit_batch([engine.Job("l.when", args=(i,)) for i in range(3)])
        for t in q.find(tags={"x": "y"}) or []:
            pass
        wait_for(lambda: len(list(q.events(follow=False))) >= 6, what="the submits logged")
        evs = list(q.events(follow=False))
        for k, e in enumerate(evs):
            rest = list(q.events(after=e.cursor, follow=False))
            want = {(x.kind, x.id) for x in evs[k + 1:]}
            assert want <= {(x.kind, x.id) for x in rest}, (k, e)
