"""The engine end to end, with a real writer process and real workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import apsw
import pytest

import engine
from engine import Segment, errors, paths, protocol, shm
from engine_helpers import (acked, done_counts, kill_writer, read_log, start_producer, start_workers, stop,
                            send_raw, wait_for, writer_in_process, writer_pid)
from helpers import CHILD_CWD, child_env


def _order(q: engine.Queue, n: int):
    """Claim `n` tasks one at a time, as a single worker would, completing each."""
    out = []
    while len(out) < n:
        jobs = q.claim(max=1, timeout=10)
        assert jobs, f"only {len(out)} of {n} tasks came out"
        j = jobs[0]
        out.append(j.args[0])
        assert j.complete()
    return out


def test_submit_is_durable_and_claimable(db):
    with engine.Queue(db) as q:
        tid = q.submit("t.x", args=(1, "a"), kwargs={"k": [1, 2]})
        # Durable on return: another connection already reads it.
        rec = engine.store.Reader(db).task(tid)
        assert rec is not None and rec["name"] == "t.x"
        [job] = q.claim(max=5, timeout=5)
        assert (job.id, job.args, job.kwargs, job.attempt) == (tid, (1, "a"), {"k": [1, 2]}, 1)
        assert job.complete()
        wait_for(lambda: q.stats()["counts"]["completed"] == 1 and q.stats()["unflushed"] == 0)
        info = q.get(tid)
        assert info.state == "completed" and info.attempts == 1


def test_priority_and_fifo_across_single_and_batch_submits(db):
    with engine.Queue(db) as q:
        expect = []
        q.submit("t", args=("s0-p1",), priority=1)
        q.submit_batch([engine.Job("t", args=(f"b0-{i}-p1",), priority=1) for i in range(3)])
        q.submit("t", args=("s1-p9",), priority=9)
        q.submit_batch([engine.Job("t", args=(f"b1-{i}-p{p}",), priority=p) for i, p in enumerate([0, 9, 1])])
        q.submit("t", args=("s2-p0",), priority=0)
        q.submit("t", args=("s3-p255",), priority=255)
        expect = ["s3-p255", "s1-p9", "b1-1-p9", "s0-p1", "b0-0-p1", "b0-1-p1", "b0-2-p1", "b1-2-p1",
                  "b1-0-p0", "s2-p0"]
        assert _order(q, len(expect)) == expect


def test_priority_order_through_a_worker_process(db, tmp_path):
    log = str(tmp_path / "log")
    with engine.Queue(db) as q:
        prios = [(i * 37) % 11 for i in range(200)]
        q.submit_batch([engine.Job("t.record", args=(i,), priority=p) for i, p in enumerate(prios)])
        w = start_workers(db, log, processes=1, tuning={"claim_batch": 1})
        try:
            wait_for(lambda: len(done_counts(log)) == 200, what="200 tasks done")
        finally:
            assert stop(w) == 0
    ran = [int(p[1]) for p in read_log(log) if p[0] == "start"]
    assert ran == sorted(range(200), key=lambda i: (-prios[i], i))


def test_batch_outcomes_dedup_rules(db):
    with engine.Queue(db) as q:
        a = q.submit("t", args=(1,), dedup_key="a")
        assert q.submit("t", args=(2,), dedup_key="a") == a  # skip: the live task's id
        with pytest.raises(errors.DuplicateTask) as ei:
            q.submit("t", args=(3,), dedup_key="a", on_duplicate="reject")
        assert ei.value.existing_id == a
        out = q.submit_batch([
            engine.Job("t", args=("x1",), dedup_key="x"),
            engine.Job("t", args=("a-new",), dedup_key="a"),
            engine.Job("t", args=("x2",), dedup_key="x"),   # last wins inside the batch
            engine.Job("t", args=("plain",)),
        ], on_duplicate="supersede")
        kinds = [o.kind for o in out.outcomes]
        assert kinds == ["duplicate", "superseded", "inserted", "inserted"]
        x2 = out.outcomes[2].id
        assert out.outcomes[0].id == x2
        assert out.superseded == [(out.outcomes[1].id, a)]
        assert out.inserted == [out.outcomes[1].id, x2, out.outcomes[3].id]
        assert out.duplicates == [x2]
        # The superseded task is cancelled; the rest run, x1 never does.
        got = sorted(map(str, _order(q, 3)))
        assert got == ["a-new", "plain", "x2"]
        assert q.claim(max=5, timeout=0.2) == []
        wait_for(lambda: q.get(a).state == "cancelled", what="superseded task cancelled")
        out = q.submit_batch([engine.Job("t", args=(9,), dedup_key="a"), engine.Job("t", args=(10,), dedup_key="z")],
                             on_duplicate="reject")
        # "a-new" completed, so its key is free again.
        assert [o.kind for o in out.outcomes] == ["inserted", "inserted"]
        out = q.submit_batch([engine.Job("t", args=(11,), dedup_key="z")], on_duplicate="reject")
        assert out.outcomes[0].kind == "rejected" and isinstance(out.outcomes[0].error, errors.DuplicateTask)
        assert out.rejected[0][0] == 0


def test_mixed_batch_rejects_bad_items_and_keeps_the_rest(db):
    class Opaque:
        def __repr__(self):
            return "<Opaque thing>"

    with engine.Queue(db) as q:
        out = q.submit_batch([
            engine.Job("t", args=(1,)),
            engine.Job("t", args=(Opaque(),)),
            engine.Job("t", args=(2,), priority=256),
            engine.Job("t", args=(3,), priority=-1),
            engine.Job("", args=(4,)),
            engine.Job("t", args=(5,)),
            "not a job",
        ])
        kinds = [o.kind for o in out.outcomes]
        assert kinds == ["inserted", "rejected", "rejected", "rejected", "rejected", "inserted", "rejected"]
        errs = [o.error for o in out.outcomes]
        assert isinstance(errs[1], TypeError) and "<Opaque thing>" in str(errs[1])
        assert isinstance(errs[2], errors.InvalidArgument) and "256" in str(errs[2])
        assert isinstance(errs[2], ValueError)
        assert isinstance(errs[4], errors.InvalidArgument)
        assert sorted(_order(q, 2)) == [1, 5]


def test_single_submit_bad_input_raises_typed_errors(db):
    with engine.Queue(db) as q:
        with pytest.raises(TypeError, match=r"\{1, 2\}"):
            q.submit("t", args=({1, 2},))
        with pytest.raises(errors.InvalidArgument, match="300"):
            q.submit("t", priority=300)
        with pytest.raises(errors.InvalidArgument, match="True"):
            q.submit("t", priority=True)
        with pytest.raises(errors.InvalidArgument, match="on_duplicate"):
            q.submit("t", on_duplicate="maybe")
        with pytest.raises(errors.PayloadTooLarge):
            q.submit("t", args=("x" * (q.settings.max_payload + 1),))
        tid = q.submit("t", args=(1,))
        assert [j.id for j in q.claim(max=5, timeout=5)] == [tid]


def test_pickle_serializer_is_opt_in(db):
    with engine.Queue(db, serializer="pickle") as q:
        tid = q.submit("t", args=({1, 2}, b"raw"))
        [j] = q.claim(max=1, timeout=5)
        assert j.id == tid and j.args == ({1, 2}, b"raw")
    with pytest.raises(errors.InvalidArgument):
        engine.Queue(db, serializer="yaml")


def test_chunking_one_transaction_and_one_wakeup_per_chunk(db):
    with engine.Queue(db, capacity=40000) as q:
        before = q.reader.counters().get("submit_txns", 0)
        ev = q.seg.event(shm.EV_PENDING)
        out = q.submit_batch([engine.Job("t", args=(i,)) for i in range(25_000)])
        assert len(out.inserted) == 25_000
        # 10k + 10k + 5k: three transactions (totals reach the table within an upkeep pass).
        wait_for(lambda: q.reader.counters().get("submit_txns", 0) - before >= 3, what="totals written")
        time.sleep(0.2)
        assert q.reader.counters()["submit_txns"] - before == 3
        assert q.seg.event(shm.EV_PENDING) - ev == 3               # one wake-up per chunk
        # FIFO within the priority across the chunks.
        jobs = q.claim(max=25_000, timeout=5)
        assert [j.args[0] for j in jobs] == list(range(25_000))


def test_two_paths_to_one_file_share_one_segment_and_writer(db, tmp_path):
    link = str(tmp_path / "alias.db")
    with engine.Queue(db) as q1:
        os.symlink(db, link)
        with engine.Queue(link) as q2:
            assert q1.seg.path == q2.seg.path
            rel = os.path.relpath(db)
            with engine.Queue(rel) as q3:
                assert q3.seg.path == q1.seg.path
            tid = q2.submit("t", args=(1,))
            [j] = q1.claim(max=1, timeout=5)
            assert j.id == tid
        assert paths.writer_alive(db)


def test_database_path_errors(tmp_path):
    with pytest.raises(errors.StoreError, match="does not exist"):
        engine.Queue(str(tmp_path / "missing" / "q.db"))
    with pytest.raises(errors.StoreError):
        engine.Queue("/proc/headrace-test.db")  # unwritable, even for root
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(errors.StoreError):
        engine.Queue(str(f / "q.db"))


def test_foreign_file_is_refused(db):
    with open(db, "wb") as f:
        f.write(b"this is not a database" * 100)
    with pytest.raises(errors.EngineError):
        engine.Queue(db)


def test_end_to_end_two_producers_two_workers_exactly_once(db, tmp_path):
    log = str(tmp_path / "log")
    n = 3000
    with engine.Queue(db):
        w = start_workers(db, log, processes=2)
        try:
            p1 = start_producer(db, 0, n // 2, batch=1)
            p2 = start_producer(db, n // 2, n, batch=100)
            for p in (p1, p2):
                _, err = p.communicate(timeout=120)
                assert p.returncode == 0, err
            assert set(acked(p1)) | set(acked(p2)) == set(range(n))
            wait_for(lambda: len(done_counts(log)) == n, timeout=120, what="all tasks done")
            time.sleep(0.3)
        finally:
            assert stop(w) == 0
    counts = done_counts(log)
    assert set(counts) == set(range(n))
    assert set(counts.values()) == {1}, "a task ran twice without any crash"
    pids = {p[2] for p in read_log(log)}
    assert len(pids) == 2, "both worker processes took work"


def test_sigterm_drains_running_task_then_exits_zero(db, tmp_path):
    log = str(tmp_path / "log")
    with engine.Queue(db) as q:
        w = start_workers(db, log, processes=1, tuning={"grace": 10.0})
        q.submit("t.record", args=(7, 1.5))
        wait_for(lambda: any(p[0] == "start" for p in read_log(log)), what="task started")
        t0 = time.monotonic()
        assert stop(w, signal.SIGTERM) == 0
        assert time.monotonic() - t0 >= 1.0  # waited for the task
        assert done_counts(log) == {7: 1}
        wait_for(lambda: q.stats()["counts"]["completed"] == 1, what="completion flushed")


def test_sigint_drains_too(db, tmp_path):
    log = str(tmp_path / "log")
    w = start_workers(db, log, processes=2)
    assert stop(w, signal.SIGINT) == 0


def test_killed_worker_tasks_run_again_and_worker_is_replaced(db, tmp_path):
    log = str(tmp_path / "log")
    with engine.Queue(db) as q:
        w = start_workers(db, log, processes=2, tuning={"lease": 1.0, "claim_batch": 4})
        try:
            q.submit_batch([engine.Job("t.record", args=(i, 0.3)) for i in range(12)])
            wait_for(lambda: any(p[0] == "start" for p in read_log(log)), what="a task started")
            victim = int(read_log(log)[0][2])
            held = {int(p[1]) for p in read_log(log) if p[0] == "start" and int(p[2]) == victim}
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: set(done_counts(log)) == set(range(12)), timeout=60, what="every task done")
            # The victim's tasks ran again on another process.
            for i in held:
                assert any(p[0] == "done" and int(p[1]) == i and int(p[2]) != victim for p in read_log(log))
            assert len({p[2] for p in read_log(log)}) >= 2
        finally:
            rc = stop(w)
        err = w.stderr.read()
        assert rc == 0
        assert "replacing it" in err
        wait_for(lambda: q.stats()["counts"]["completed"] == 12, what="completions flushed")


def test_a_worker_claims_a_stream_in_batches_and_a_task_after_a_pause_at_once(db, monkeypatch):
    import threading
    from engine import workers
    linger = 1.0  # long, so that scheduling delays on a loaded machine stay far below it
    ran = []
    claims = []
    real_claim = workers._claim

    def counting_claim(*args, **kwargs):
        jobs = real_claim(*args, **kwargs)
        if jobs:
            claims.append(len(jobs))
        return jobs
    monkeypatch.setattr(workers, "_claim", counting_claim)
    with engine.Queue(db, claim_linger=linger) as q:
        @q.task(name="t.note")
        def note(i):
            ran.append((i, time.monotonic()))
        stopping = threading.Event()
        worker = threading.Thread(target=workers.work, args=(q, stopping.is_set))
        worker.start()
        try:
            t0 = time.monotonic()
            q.submit("t.note", args=(0,))
            wait_for(lambda: len(ran) == 1, what="the first task ran")
            assert ran[0][1] - t0 < linger / 2, "a task that comes to an idle worker waits for no linger"
            for i in range(1, 21):  # a stream, one by one
                q.submit("t.note", args=(i,))
                time.sleep(0.005)
            wait_for(lambda: len(ran) == 21, what="the stream ran")
            assert sum(claims) == 21 and len(claims) <= 3, claims  # one claim per task without the linger
            time.sleep(linger * 1.5)
            t1 = time.monotonic()
            q.submit("t.note", args=(21,))
            wait_for(lambda: len(ran) == 22, what="the task after the pause ran")
            assert ran[-1][1] - t1 < linger / 2, "after a pause longer than the linger, a task is claimed at once"
        finally:
            stopping.set()
            worker.join()
    assert [i for i, _ in ran] == list(range(22))


def test_unknown_task_fails_clearly_and_worker_lives(db, tmp_path):
    log = str(tmp_path / "log")
    with engine.Queue(db) as q:
        w = start_workers(db, log, processes=1)
        try:
            bad = q.submit("no.such.task", args=(1,))
            good = q.submit("t.record", args=(2,))
            wait_for(lambda: done_counts(log) == {2: 1}, what="the good task ran")
            wait_for(lambda: q.get(bad).state == "dead", what="the unknown task is dead")
            assert q.get(good).state in ("completed", "running")
        finally:
            assert stop(w) == 0
        assert "no task named 'no.such.task'" in w.stderr.read()


def test_failing_task_retries_up_to_max_attempts_then_dead(db, tmp_path):
    log = str(tmp_path / "log")
    with engine.Queue(db) as q:
        w = start_workers(db, log, processes=1)
        try:
            tid = q.submit("t.boom", args=(1,), max_attempts=2)
            wait_for(lambda: q.get(tid).state == "dead", what="dead after 2 attempts")
        finally:
            assert stop(w) == 0
        assert [p[0] for p in read_log(log)] == ["boom", "boom"]
        assert q.get(tid).attempts == 2


def test_writer_killed_under_load_loses_no_acknowledged_submit(db, tmp_path):
    log = str(tmp_path / "log")
    n, big = 30000, 100_000
    with engine.Queue(db):
        # One by one, small batches, and (for longer, so that kills land while it sends) batches big
        # enough to be sent in parts (api.STREAM_MIN).
        producers = [start_producer(db, 0, n // 2, batch=1), start_producer(db, n // 2, n, batch=50),
                     start_producer(db, n, n + big, batch=1000)]
        killed = set()
        deadline = time.monotonic() + 60
        progress = 0
        # Kill each writer once it is serving again and producers made progress.
        while any(p.poll() is None for p in producers) and time.monotonic() < deadline and len(killed) < 3:
            time.sleep(0.05)
            done = sum(len(acked(p)) for p in producers)
            pid = writer_pid(db)
            if pid and pid not in killed and paths.writer_alive(db) and done >= progress + 200:
                kill_writer(db)
                killed.add(pid)
                progress = done
        for p in producers:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        acks = {k: v for p in producers for k, v in acked(p).items()}
        assert set(acks) == set(range(n + big))
        assert len(killed) >= 2, "the writer was never killed while producers ran"
        # It came back: every acknowledged id is stored and runs.
        w = start_workers(db, log, processes=2)
        try:
            wait_for(lambda: set(done_counts(log)) == set(range(n + big)), timeout=120,
                     what="all acknowledged tasks ran")
        finally:
            assert stop(w) == 0
        assert writer_pid(db) not in killed


def test_simulated_reboot_recovers_acknowledged_unfinished_tasks(db):
    q = engine.Queue(db, lease=60.0)
    ids = q.submit_batch([engine.Job("t", args=(i,), priority=i % 3) for i in range(300)]).inserted
    running = q.claim(max=50, timeout=5)
    assert len(running) == 50
    done = q.claim(max=50, timeout=5)
    for j in done:
        assert j.complete()
    wait_for(lambda: q.stats()["unflushed"] == 0, what="flush")
    stale = running[0]
    # Every process dies, and the segment goes with the "reboot".
    kill_writer(db)
    wait_for(lambda: not paths.writer_alive(db), what="writer dead")
    seg_path = q.seg.path
    q.close()
    os.unlink(seg_path)
    q = engine.Queue(db, lease=60.0)
    try:
        done_ids = {j.id for j in done}
        left = set(ids) - done_ids
        jobs = q.claim(max=1000, timeout=5)
        got = {j.id for j in jobs}
        assert got == left
        # Attempts are fenced: a task that was running gets a new attempt,
        # and the stale attempt's completion is ignored.
        again = {j.id: j for j in jobs}[stale.id]
        assert again.attempt > stale.attempt
        stale.queue = q  # the same stale attempt, reported through the new segment
        assert not stale.complete()
        # Order survived: best priority first, FIFO within it.
        rank = {tid: (-(i % 3), i) for i, tid in enumerate(ids)}
        assert [j.id for j in jobs] == sorted(got, key=rank.__getitem__)
    finally:
        q.close()


def test_backlog_three_times_capacity_drains_in_priority_order(db):
    cap = 64
    with engine.Queue(db, capacity=cap) as q:
        prios = [(i * 7919) % 13 for i in range(3 * cap)]
        q.submit_batch([engine.Job("t", args=(i,), priority=p) for i, p in enumerate(prios)])
        s = q.stats()
        assert s["spilled"] > 0 and s["in_memory"] <= cap
        # A new high-priority task still runs before every spilled one.
        q.submit("t", args=("urgent",), priority=200)
        time.sleep(0.3)  # several upkeep passes
        assert q._seg.info()["stats"]["evicted"] == 1, "only the urgent task swapped with the worst in memory"
        got = _order(q, 3 * cap + 1)
        assert got[0] == "urgent"
        assert got[1:] == sorted(range(3 * cap), key=lambda i: (-prios[i], i))
        assert q.stats()["spilled"] == 0


def test_spill_keeps_dedup(db):
    with engine.Queue(db, capacity=8) as q:
        q.submit_batch([engine.Job("t", args=(i,), priority=9) for i in range(8)])
        low = q.submit("t", args=("low",), priority=0, dedup_key="k")
        assert q.get(low).spilled
        assert q.submit("t", args=("again",), dedup_key="k") == low
        new = q.submit("t", args=("new",), dedup_key="k", on_duplicate="supersede")
        assert new != low
        wait_for(lambda: q.get(low).state == "cancelled", what="spilled task superseded")
        assert sorted(map(str, _order(q, 9))) == sorted([str(i) for i in range(8)] + ["new"])


def test_one_writer_even_when_many_open_at_once(db):
    code = "import sys, engine; q = engine.Queue(sys.argv[1]); q.submit('t'); print('ok'); q.close()"
    ps = [subprocess.Popen([sys.executable, "-c", code, db], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=child_env(), cwd=CHILD_CWD) for _ in range(4)]
    for p in ps:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out.strip() == "ok", err
    with engine.Queue(db) as q:
        wait_for(lambda: q.stats()["submitted"] == 4, what="4 submits counted")
        pid = writer_pid(db)
        kill_writer(db)
        q.submit("t")   # the next process that needs a writer restarts it
        assert writer_pid(db) != pid and paths.writer_alive(db)


def test_writer_exits_after_last_client_closes(db):
    q = engine.Queue(db, idle_exit=0.2)
    q.submit("t")
    assert paths.writer_alive(db)
    seg_path = q.seg.path
    q.close()
    wait_for(lambda: not paths.writer_alive(db), timeout=20, what="writer exit")
    assert not os.path.exists(seg_path)
    with engine.Queue(db) as q:  # the next open rebuilds from the database
        [j] = q.claim(max=5, timeout=5)
        assert j.name == "t"


def test_cli_stats_inspect_worker(db, tmp_path):
    app = tmp_path / "cliapp.py"
    app.write_text(
        "import os, engine\n"
        f"q = engine.Queue({db!r})\n"
        "@q.task(name='cli.touch')\n"
        "def touch(p):\n"
        "    open(p, 'a').write('x')\n")
    mark = str(tmp_path / "mark")
    with engine.Queue(db) as q:
        tid = q.submit("cli.touch", args=(mark,))
        w = subprocess.Popen([sys.executable, "-m", "engine", "worker", "cliapp:q", "--processes", "1"],
                             cwd=str(tmp_path), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            wait_for(lambda: os.path.exists(mark), what="the CLI worker ran the task")
        finally:
            assert stop(w) == 0
        wait_for(lambda: q.get(tid).state == "completed", what="completion flushed")
    r = subprocess.run([sys.executable, "-m", "engine", "stats", db, "--json"], capture_output=True, text=True,
                       env=child_env(), cwd=CHILD_CWD, timeout=60)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["counts"]["completed"] == 1 and s["submitted"] == 1
    r = subprocess.run([sys.executable, "-m", "engine", "stats", db], capture_output=True, text=True,
                       env=child_env(), cwd=CHILD_CWD, timeout=60)
    assert "completed" in r.stdout and r.returncode == 0
    r = subprocess.run([sys.executable, "-m", "engine", "inspect", db, str(tid), "--json"], capture_output=True,
                       text=True, env=child_env(), cwd=CHILD_CWD, timeout=60)
    t = json.loads(r.stdout)
    assert t["state"] == "completed" and t["name"] == "cli.touch" and t["attempts"] == 1
    r = subprocess.run([sys.executable, "-m", "engine", "inspect", db, "999999"], capture_output=True, text=True,
                       env=child_env(), cwd=CHILD_CWD, timeout=60)
    assert r.returncode == 1 and "no task 999999" in r.stderr
    r = subprocess.run([sys.executable, "-m", "engine", "stats", str(tmp_path / "nope.db")], capture_output=True,
                       text=True, env=child_env(), cwd=CHILD_CWD, timeout=60)
    assert r.returncode == 1 and "no database" in r.stderr


def test_demo_runs_and_verifies(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine", "demo", "--tasks", "3000", "--processes", "2",
                        "--path", str(tmp_path / "demo.db")], capture_output=True, text=True, env=child_env(),
                       cwd=CHILD_CWD, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted 3,000, completed 3,000, lost 0" in r.stdout
    assert "enqueue -> done" in r.stdout and "p99" in r.stdout


def test_a_task_completed_within_one_flush_costs_one_outcome_row(db):
    """Transitions coalesce: the writer writes a slot's current state, so a
    claim and a completion inside one flush interval append one row."""
    with engine.Queue(db, flush_interval=2.0) as q:
        ids = q.submit_batch([engine.Job("t", args=(i,)) for i in range(200)]).inserted
        jobs = q.claim(max=200, timeout=5)
        assert len(jobs) == 200
        for j in jobs:
            assert j.complete()
        wait_for(lambda: q.stats()["unflushed"] == 0, timeout=20, what="flush")
        rows = list(q.reader.conn.execute("SELECT id, state FROM outcomes"))
        assert sorted(r[0] for r in rows) == sorted(ids)
        assert {r[1] for r in rows} == {shm.COMPLETED}


def test_writer_owns_checkpoints(db, tmp_path):
    # PASSIVE on a timer: the WAL's pages reach the main file (autocheckpoint is off).
    with engine.Queue(db, checkpoint_interval=0.05) as q:
        q.submit_batch([engine.Job("t", args=("x" * 500,)) for _ in range(5000)])
        wait_for(lambda: os.path.getsize(db) > 5000 * 500, what="a checkpoint into the main file")
        assert os.path.getsize(db + "-wal") > 0  # PASSIVE leaves the WAL file's size alone
    # TRUNCATE once the WAL outgrows its bound.  Only a TRUNCATE shrinks the
    # file (no journal_size_limit is set): the ~3 MB of this batch's frames
    # must come down to the bound.  Not to 0: a commit right after the
    # TRUNCATE may leave one frame (2,104 bytes at 2 KiB pages), under the
    # bound, so no second TRUNCATE comes (seen 4 times waiting for 0).
    db2 = str(tmp_path / "t.db")
    with engine.Queue(db2, checkpoint_interval=0.05, wal_truncate_bytes=4096) as q:
        q.submit_batch([engine.Job("t", args=("x" * 500,)) for _ in range(5000)])
        try:
            wait_for(lambda: os.path.getsize(db2 + "-wal") <= 4096, what="a TRUNCATE checkpoint")
        except AssertionError as e:  # say what held it up
            probe = apsw.Connection(db2, flags=apsw.SQLITE_OPEN_READONLY)
            try:
                busy = probe.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
            except apsw.Error as ce:
                busy = repr(ce)
            probe.close()
            with open(paths.log_path(db2)) as f:
                log = f.read()[-2000:]
            raise AssertionError(f"{e}; WAL {os.path.getsize(db2 + '-wal')} bytes, a PASSIVE checkpoint from "
                                 f"here: {busy}, writer alive: {paths.writer_alive(db2)}, its log: {log!r}") from None


def test_a_malformed_request_is_refused_and_the_writer_carries_on(db):
    with engine.Queue(db) as q:
        pid = writer_pid(db)
        for junk in (b"\x00\x01garbage", protocol.encode_request(0, [("not", "an item")])):
            with pytest.raises(errors.SubmitFailed, match="malformed"):
                protocol.decode_answer(send_raw(q, junk))
        assert writer_pid(db) == pid and paths.writer_alive(db)
        tid = q.submit("t", args=(1,))
        assert [j.id for j in q.claim(max=1, timeout=5)] == [tid]


@pytest.mark.parametrize("var,site", [("HEADRACE_WRITER_FAULT", "commit"), ("HEADRACE_WRITER_FAULT", "committed"),
                                      ("HEADRACE_FAULT", "turn_commit"), ("HEADRACE_FAULT", "turn_committed")])
def test_writer_killed_inside_or_right_after_its_commit(db, monkeypatch, var, site):
    """Killed between BEGIN and COMMIT, the chunk is wholly out and is sent
    again; killed after COMMIT but before answering, the replayed request is
    recognised by its ids: either way every submit returns once, and each
    task exists and runs exactly once.  The Python turn's sites, and the C
    turn's (which a writer with a Python site armed does not take).  The
    events the C turn held are written by the next writer."""
    monkeypatch.setenv(var, f"{site}:3")
    with engine.Queue(db) as q:
        monkeypatch.delenv(var)  # the restarted writer runs clean
        first = writer_pid(db)
        ids = [q.submit("t", args=(i,)) for i in range(5)]
        assert writer_pid(db) != first, "the fault never fired"
        stored = sorted(r[0] for r in q.reader.conn.execute("SELECT id FROM tasks"))
        assert stored == sorted(ids) and len(set(ids)) == 5
        # One submit event each: none lost with the writer, none written twice.
        events = lambda: sorted(e.id for e in q.events(follow=False) if e.kind == "submitted")  # noqa: E731
        wait_for(lambda: len(events()) >= 5, timeout=10, what="the submit events")
        assert events() == sorted(ids)
        got = []
        while len(got) < 5:
            jobs = q.claim(max=10, timeout=5)
            assert jobs, f"only {got} came out"
            got += [j.args[0] for j in jobs]
        assert sorted(got) == list(range(5))
        assert q.claim(max=10, timeout=0.3) == []


def test_attempt_claimed_before_a_rebuild_is_fenced_even_if_never_flushed(db):
    with engine.Queue(db, flush_interval=5.0) as q:
        tid = q.submit("t", args=(1,))
        [old] = q.claim(max=1, timeout=5)   # its "running" row is not on disk yet
        kill_writer(db)
        wait_for(lambda: not paths.writer_alive(db), what="writer dead")
        os.unlink(q.seg.path)               # the segment is lost: the next writer rebuilds it
        q._refresh()
        [again] = q.claim(max=1, timeout=5)
        assert again.id == tid
        assert not old.complete()           # the pre-rebuild attempt cannot finish it
        assert again.complete()


def test_a_submit_sent_into_a_lost_segment_is_sent_again_and_stored_once(db, monkeypatch):
    """A one-by-one submit sent while the writer is dead and its segment
    gone: the producer restarts the writer, which rebuilds the segment, and
    sends the submit again as a replay; it returns the id it was given, and
    the task is stored and runs once."""
    replays = []
    real = engine.Queue._send_chunk

    def send_chunk(self, items, mode, replay=False):
        replays.append(replay)
        return real(self, items, mode, replay)
    monkeypatch.setattr(engine.Queue, "_send_chunk", send_chunk)
    with engine.Queue(db) as q:
        before = q.submit("t", args=("before",))
        assert replays == [], "a plain submit goes in one call, not as a chunk"
        generation = q.seg.generation
        kill_writer(db)
        wait_for(lambda: not paths.writer_alive(db), what="writer dead")
        os.unlink(q.seg.path)
        tid = q.submit("t", args=("after",))
        assert replays == [True] and q.seg.generation != generation
        assert sorted(r[0] for r in q.reader.conn.execute("SELECT id FROM tasks")) == sorted([before, tid])
        jobs = q.claim(max=10, timeout=5)
        assert sorted((j.id, j.args[0]) for j in jobs) == sorted([(before, "before"), (tid, "after")])
        assert q.claim(max=10, timeout=0.3) == []


def test_a_rebuild_removes_a_half_built_segment_left_by_a_dead_writer(db):
    with engine.Queue(db) as q:
        name = paths.segment_name(db)
        seg_path = q.seg.path
    wait_for(lambda: not paths.writer_alive(db), timeout=20, what="writer exit")
    leftover = Segment.create(f"{name}.new999999", 8)  # as if a writer died mid-rebuild
    leftover.close()
    assert os.path.exists(leftover.path)
    with engine.Queue(db) as q:
        assert q.seg.path == seg_path
        assert not os.path.exists(leftover.path)


def test_verify_checks_that_the_database_and_the_segment_agree(db):
    with engine.Queue(db, capacity=8) as q:
        ids = [q.submit("t", args=(i,)) for i in range(12)]  # 8 in memory, 4 spilled
        job = q.claim(1, timeout=5)[0]
        assert job.complete()
        assert q.verify() == 11
        victim = next(t for t in ids if q.get(t).spilled)
        conn = apsw.Connection(db)
        conn.execute("DELETE FROM spill WHERE id = ?", (victim,))  # live on disk, but nowhere to run from
        conn.close()
        with pytest.raises(errors.StoreCorrupt, match=f"neither in the segment nor spilled \\(e.g. {victim}\\)"):
            q.verify()
        r = subprocess.run([sys.executable, "-m", "engine.cli", "verify", db], capture_output=True, text=True,
                           env=child_env(), cwd=CHILD_CWD, timeout=60)
        assert r.returncode != 0 and "neither in the segment nor spilled" in r.stderr, r


def test_reports_that_cannot_be_stored_fail_their_attempts_and_the_writer_carries_on(db, monkeypatch, capfd):
    """A report whose outcomes cannot be stored (not a disk error: retrying
    would fail every turn) is dropped, and its attempts count as failed, so
    the task runs again; the next report of the same task is stored."""
    with writer_in_process(db) as iw, engine.Queue(db) as q:
        w = iw.w
        tid = q.submit("t", args=(1,))
        job = q.claim(1, timeout=5)[0]

        def refuse(rows):
            raise TypeError("cannot store this result")
        monkeypatch.setattr(w.store, "put_results", refuse)
        job.complete({"v": 1})
        wait_for(lambda: q.get(tid).state == "pending", what="the dropped report's attempt failed")
        assert "dropped a report of 1 outcomes" in capfd.readouterr().err
        monkeypatch.undo()
        again = q.claim(1, timeout=5)[0]
        assert again.attempt == 2 and again.complete({"v": 2})
        assert q.result(tid, timeout=10) == {"v": 2}


def test_get_never_shows_an_older_state_while_the_writer_flushes(db):
    """q.get reads the segment before the database: a slot is freed only
    after its outcome is committed, so a task that just ended never reads
    back as live (it did when the database was read first and the slot was
    freed in between)."""
    with engine.Queue(db) as q:
        seen = set()
        for i in range(40):
            tid = q.submit("t", args=(i,), delay=60)
            q.cancel(tid)
            end = time.monotonic() + 0.05  # across the flush (20 ms) and the slot's release
            while time.monotonic() < end:
                seen.add(q.get(tid).state)
        assert seen == {"cancelled"}


INTERRUPTED_PRODUCER = r'''
import sys, time
import engine
q = engine.Queue(sys.argv[1])
q.submit("t", args=(0,))
print("ready", flush=True)
sys.stdin.readline()
try:
    q.submit("t", args=(1,))
    print("answered", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
print(q.submit("t", args=(2,)), flush=True)  # the process goes on using the queue
time.sleep(120)
'''


def test_a_submit_interrupted_while_it_waits_leaves_the_request_area_reclaimable(db):
    """A KeyboardInterrupt while a submit waits for its commit gives its
    record up: an answer left unread would keep the writer from reclaiming
    any later record while the process lives, and the area would fill."""
    with engine.Queue(db) as q:
        q.submit("t", args=(-1,))  # the writer is up
        wpid = writer_pid(db)
        p = subprocess.Popen([sys.executable, "-c", INTERRUPTED_PRODUCER, db], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=child_env(), cwd=CHILD_CWD)
        try:
            assert p.stdout.readline().strip() == "ready"
            os.kill(wpid, signal.SIGSTOP)  # the next submit waits until we let it go on
            try:
                p.stdin.write("go\n")
                p.stdin.flush()
                time.sleep(0.3)  # it is inside the wait
                p.send_signal(signal.SIGINT)
                time.sleep(0.5)  # the wait returns (its check interval) and raises
            finally:
                os.kill(wpid, signal.SIGCONT)
            assert p.stdout.readline().strip() == "interrupted"
            last = int(p.stdout.readline())
            assert q.get(last).state == "pending"
            seg = q.seg
            wait_for(lambda: seg.req_bounds()[0] == seg.req_bounds()[1], timeout=10,
                     what="every record reclaimed, the interrupted one too")
            assert p.poll() is None, "the producer lives on"
        finally:
            p.kill()
            p.wait()


def test_completing_a_job_of_a_closed_queue_raises_and_a_stale_one_is_refused(db):
    q = engine.Queue(db)
    q.submit("t", args=(1,))
    (job,) = q.claim(max=1, timeout=5)
    q.close()
    with pytest.raises(errors.EngineError, match="closed"):
        job.complete()
    with engine.Queue(db) as q2:
        q2.submit("t", args=(2,))
        (fresh,) = q2.claim(max=1, timeout=5)
        assert fresh.complete() is True
        assert fresh.complete() is False, "a second report of one attempt is fenced"


def test_threads_submitting_one_by_one_on_one_queue_each_get_their_own_ids(db):
    """A queue shared by producer threads: every submit returns the id of
    the task it stored (one-by-one submits wait in C, with the GIL released)."""
    import threading
    got: dict = {}
    errs: list = []
    with engine.Queue(db) as q:
        def produce(t: int) -> None:
            try:
                for i in range(300):
                    got[q.submit("t", args=(t, i))] = (t, i)
            except Exception as e:  # reported below
                errs.append(e)
        threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errs and len(got) == 1200, (errs, len(got))
        stored = {tid: tuple(engine.api.loads(0, body)[0]) for tid, body in
                  q.reader.conn.execute("SELECT id, body FROM payloads")}
        assert stored == got, "each returned id holds the job its thread submitted"


def test_a_plain_send_too_big_for_the_request_area_raises_naming_its_size(db):
    """Both ways of sending a one-job request refuse one that can never fit
    with a typed error naming its size, rather than waiting for room."""
    with engine.Queue(db, request_bytes=1 << 16) as q:
        body = b"[[1],{}]" + b" " * (1 << 16)
        sends = (lambda: q.seg.send_plain(0, b"t", body, 0, 0, 0, 1, 1, 0, 0),
                 lambda: q.seg.submit_plain(0, b"t", body, 0, 0, 0, 1, 1, 0, 0, 0.1))
        for send in sends:
            with pytest.raises(errors.EngineError, match=f"send_plain of {len(body)} bytes.*at most"):
                send()
        assert q.submit("t", args=(1,)) > 0  # nothing was left half sent


def test_segments_left_by_killed_writers_go_once_their_database_is_gone(tmp_path, capsys):
    """A writer killed with kill -9 leaves its segment (tens of MB of memory
    until a reboot).  Once the database it names is gone, the next writer
    to start removes it, and so does `headrace gc`; a segment whose
    database is still there, or that a process has mapped, stays."""
    import glob
    from engine import cli
    dbs = {k: str(tmp_path / f"{k}.db") for k in ("gone", "kept", "busy", "next")}
    # Made first: a database made after the others are deleted may get one
    # of their inode numbers, and so their segment's name.
    with engine.Queue(dbs["next"], idle_exit=0.1):
        pass
    wait_for(lambda: not paths.writer_alive(dbs["next"]), what="the writer of next.db exited")
    segs = {}
    for k in ("gone", "kept", "busy"):
        with engine.Queue(dbs[k]) as q:
            q.submit("t.record", args=(1,))
            segs[k] = q.seg.path
            kill_writer(dbs[k])
            wait_for(lambda: not paths.writer_alive(dbs[k]), what="the writer gone")
    for k, path in segs.items():
        assert shm.read_note(path) == os.fsencode(dbs[k]), "a segment names its database"
    for k in ("gone", "busy"):
        for f in glob.glob(dbs[k] + "*"):
            os.unlink(f)
    busy = Segment.attach(os.path.basename(segs["busy"])[len(shm.PREFIX):])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    half = Segment.create(f"db-1-2.new{dead.pid}", 16)  # a rebuild its writer did not finish
    half.close()
    try:
        assert cli.main(["gc", "--dry-run", "--json"]) == 0
        listed = {r["segment"]: r["why"] for r in json.loads(capsys.readouterr().out)}
        assert segs["gone"] in listed and "is gone" in listed[segs["gone"]], listed
        assert half.path in listed and "half built" in listed[half.path], listed
        assert segs["kept"] not in listed and segs["busy"] not in listed, "its database is there / it is mapped"
        assert all(os.path.exists(p) for p in (segs["gone"], half.path)), "a dry run removes nothing"
        with engine.Queue(dbs["next"]):  # a new writer, which looks for stale segments as it starts
            wait_for(lambda: not os.path.exists(segs["gone"]) and not os.path.exists(half.path),
                     what="the next writer removed the stale segments")

            def logged() -> str:
                with open(paths.log_path(dbs["next"])) as f:
                    return f.read()
            # It says so once it removed them all.
            wait_for(lambda: f"removed segment {segs['gone']}: its database {dbs['gone']} is gone" in logged(),
                     what="the removal in the writer's log")
        assert os.path.exists(segs["kept"]) and os.path.exists(segs["busy"])
    finally:
        busy.close()
        shm._unlink_quiet(half.path)
    assert cli.main(["gc"]) == 0 and "removed " + segs["busy"] in capsys.readouterr().out
    assert not os.path.exists(segs["busy"]) and os.path.exists(segs["kept"])
    with engine.Queue(dbs["kept"]) as q:  # a kept segment serves its database again
        assert q.stats()["counts"]["pending"] == 1
