"""Helpers for end-to-end tests: real writer, worker and producer processes."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import psutil

from engine.paths import writer_pid
from helpers import CHILD_CWD, child_env

#: A worker program: tasks append "arg pid attempt" lines to a log file.
WORKER_APP = r'''
import os, sys, time
import engine

db, log, procs = sys.argv[1], sys.argv[2], int(sys.argv[3])
tuning = eval(sys.argv[4]) if len(sys.argv) > 4 else {}
q = engine.Queue(db, **tuning)

def _log(line):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, (line + "\n").encode())
    os.close(fd)

@q.task(name="t.record")
def record(i, sleep=0.0):
    _log(f"start {i} {os.getpid()}")
    if sleep:
        time.sleep(sleep)
    _log(f"done {i} {os.getpid()}")

@q.task(name="t.boom", max_attempts=2)
def boom(i):
    _log(f"boom {i} {os.getpid()}")
    raise RuntimeError(f"boom {i}")

print("ready", flush=True)
sys.exit(q.run_workers(processes=procs, grace=float(tuning.get("grace", 30.0))))
'''

#: A producer program: submits ids [lo, hi) one by one or in batches and
#: writes each acknowledged "index id" to its ack file as soon as its submit
#: returned (a file, not a pipe, so that nobody has to read it meanwhile).
PRODUCER_APP = r'''
import sys
import engine

db, lo, hi, batch, ack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
q = engine.Queue(db)
out_file = open(ack, "w", buffering=1)
i = lo
while i < hi:
    if batch <= 1:
        tid = q.submit("t.record", args=(i,))
        out_file.write(f"{i} {tid}\n")
        i += 1
    else:
        end = min(hi, i + batch)
        out = q.submit_batch([engine.Job("t.record", args=(k,)) for k in range(i, end)])
        for k, o in zip(range(i, end), out.outcomes):
            assert o.kind == "inserted", o
            out_file.write(f"{k} {o.id}\n")
        i = end
q.close()
'''


def start_workers(db: str, log: str, processes: int = 2, tuning: Optional[Dict] = None) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WORKER_APP, db, log, str(processes), repr(tuning or {})],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                         cwd=CHILD_CWD)
    line = p.stdout.readline()  # type: ignore[union-attr]
    assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")  # type: ignore[union-attr]
    # The supervisor has its handlers once its workers exist.
    sup = psutil.Process(p.pid)
    wait_for(lambda: len(sup.children()) >= processes or p.poll() is not None, what="worker processes")
    return p


def start_producer(db: str, lo: int, hi: int, batch: int = 1) -> subprocess.Popen:
    """A producer process; its acknowledgements go to ``p.ack`` (see :func:`acked`)."""
    ack = f"{db}.ack-{lo}-{hi}"
    p = subprocess.Popen([sys.executable, "-c", PRODUCER_APP, db, str(lo), str(hi), str(batch), ack],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(),
                         cwd=CHILD_CWD)
    p.ack = ack  # type: ignore[attr-defined]
    return p


def acked(p: subprocess.Popen) -> Dict[int, int]:
    """index -> task id for every submit producer `p` saw return."""
    out: Dict[int, int] = {}
    if os.path.exists(p.ack):  # type: ignore[attr-defined]
        with open(p.ack) as f:  # type: ignore[attr-defined]
            for line in f:
                # While the producer runs, a reader can see a line whose
                # write is still landing (even NUL bytes): skip it; once the
                # producer has exited, every line is whole.
                parts = line.split()
                if line.endswith("\n") and len(parts) == 2 and all(x.isdigit() for x in parts):
                    out[int(parts[0])] = int(parts[1])
    return out


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if p.poll() is None:
        p.send_signal(sig)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise


def read_log(log: str) -> List[List[str]]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [line.split() for line in f if line.strip()]


def done_counts(log: str) -> Dict[int, int]:
    out: Dict[int, int] = {}
    for parts in read_log(log):
        if parts[0] == "done":
            out[int(parts[1])] = out.get(int(parts[1]), 0) + 1
    return out


def wait_for(cond: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def kill_writer(db: str) -> Optional[int]:
    pid = writer_pid(db)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pid


def send_raw(q, data: bytes) -> bytes:
    """Publish `data` as a request in `q`'s request area, as a producer
    would, and return the writer's answer."""
    pos = q.seg.req_reserve(len(data) + 256)
    q.seg.req_write(pos, data)
    q.seg.req_publish(pos)
    return q._await_answer(pos)


class InProcessWriter:
    """A real Writer in the test's process, turned by a thread (queues attach
    to it as to any writer), so that a test can reach into it."""

    def __init__(self, db: str, upkeep: bool, **settings: Any) -> None:
        from engine import config
        from engine.writer import Writer
        self.w = Writer(db, config.settings(**settings))
        self.upkeep = upkeep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            if not self.w.turn():
                time.sleep(0.001)
            if self.upkeep:
                self.w.upkeep.maybe_run()

    def pause(self) -> None:
        """Stop turning (the test may then call the writer from its own thread)."""
        self._stop.set()
        self._thread.join(10)


@contextlib.contextmanager
def writer_in_process(db: str, upkeep: bool = True, **settings: Any) -> Iterator[InProcessWriter]:
    iw = InProcessWriter(db, upkeep, **settings)
    try:
        yield iw
    finally:
        iw.pause()
        if iw.w.wal_sync is not None:
            iw.w.wal_sync.close()
        iw.w.store.close()
        os.ftruncate(iw.w.lock_fd, 0)  # the db fixture stops the writer named there: not this process
        os.close(iw.w.lock_fd)
