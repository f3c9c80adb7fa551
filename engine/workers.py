"""Workers: claiming from the segment, running task functions, reporting
outcomes there, and the supervisor that keeps N worker processes alive.

A worker never writes the database: it changes the task's slot and the
writer flushes the change.  It reads payloads through a read-only
connection.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from . import errors, protocol, shm
from .api import SERIALIZERS, dumps_value, loads
from .shm import Ticket, now_us

if TYPE_CHECKING:  # pragma: no cover
    from .api import Queue

#: Named exit codes of worker processes.
EXIT_OK = 0
EXIT_CRASHED = 1
#: Seconds between the supervisor's checks on its children and the writer.
SUPERVISE_INTERVAL = 0.1
#: Seconds an idle claim waits before it checks that its segment is current.
IDLE_CHECK = 0.5
#: Longest a stopping worker waits for the writer to settle the outcomes it sent (seconds).
SETTLE_WAIT = 10.0
#: Longest stored error message or traceback summary, in characters.
MAX_ERROR = 4000
#: Bytes a result report takes besides the result itself.
REPORT_ROOM = 256


class ClaimedJob:
    """A claimed attempt of one task; report it with :meth:`complete` or :meth:`fail`."""

    __slots__ = ("queue", "seg", "id", "name", "args", "kwargs", "attempt", "max_attempts", "created", "ticket",
                 "done", "ser", "reported", "timeout_ms")

    def __init__(self, queue: "Queue", ticket: Ticket, name: str, args: tuple, kwargs: dict,
                 max_attempts: int, created_us: int, ser: int = 0, timeout_ms: int = 0) -> None:
        self.queue = queue
        # A ticket is only meaningful in the segment it came from: after a
        # rebuild, slot numbers and unflushed attempt counts start afresh.
        self.seg = queue._seg
        self.ticket = ticket
        self.id = ticket.id
        self.attempt = ticket.attempt
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.max_attempts = max_attempts
        self.created = created_us / 1e6
        self.done = False
        self.ser = ser
        #: Reported through the writer, which settles the slot later: until
        #: then the lease is still renewed, so a slow writer cannot make a
        #: finished attempt expire.
        self.reported = False
        #: The attempt's processing deadline (0: none), counted from :meth:`start`.
        self.timeout_ms = timeout_ms

    def start(self) -> bool:
        """Start this attempt's deadline now (a batch claimed ahead of time
        starts each job's clock as it runs); False if it was fenced."""
        seg = self.queue.seg
        return seg is self.seg and seg.clock(self.ticket, True, self._lease_until())

    def _send(self, report: protocol.Report) -> bool:
        """Hand an outcome with data to the writer, which settles the slot
        once the data is stored; False (and nothing sent) if this attempt no
        longer counts.  Whether it counts is decided here, before sending: a
        writer quick to settle the slot must not make a sent outcome look
        fenced.  The deadline stops first: a finished attempt never times out
        while its report waits."""
        if self.timeout_ms:
            ok = self.seg.clock(self.ticket, False, self._lease_until())
        else:
            ok = self.current()
        if not ok:
            return False
        self.queue._report([report])
        self.done, self.reported = False, True  # its lease is renewed until the writer settles it
        return True

    def complete(self, result: Any = None) -> bool:
        """Mark the task completed with `result` (serialised like payloads);
        False if this attempt was fenced (it is stale)."""
        self.done = True
        seg = self.queue._seg
        if seg is not self.seg:
            return self.queue.seg is None  # False; raises if the queue is closed
        if result is None:
            return seg.finish(self.ticket, shm.COMPLETED)
        body = dumps_value(self.ser, result)  # NotSerializable names a value that cannot be stored
        q = self.queue
        if len(body) > q._max_payload:
            raise errors.PayloadTooLarge(f"the result of task {self.id} is {len(body)} bytes; the limit is "
                                         f"{q._max_payload} (setting max_payload)")
        if len(body) > q._request_room - REPORT_ROOM:
            raise errors.PayloadTooLarge(f"the result of task {self.id} is {len(body)} bytes; the request area "
                                         f"takes at most {q._request_room - REPORT_ROOM} (setting request_bytes)")
        # The writer stores the value, then completes the slot: the task is
        # never completed on disk without its result.
        return self._send((self.id, self.ticket.slot, self.attempt, protocol.RESULT, 0, 0, body))

    def fail(self, error: Optional[BaseException] = None, retry: bool = True, delay: Optional[float] = None
             ) -> bool:
        """Report a failed attempt.  While attempts remain and `retry` is
        true the task runs again: after `delay` seconds, or as its backoff
        says; else it is dead.  The error (type, message, traceback summary)
        is stored on the task.  False if this attempt was fenced."""
        if delay is not None and (not isinstance(delay, (int, float)) or isinstance(delay, bool)
                                  or not 0 <= delay <= 10**8):
            raise errors.InvalidArgument(f"delay must be None or seconds in 0..1e8, got {delay!r}")
        self.done = True
        seg = self.queue.seg
        if seg is not self.seg:
            return False
        delay_us = -1 if delay is None else int(delay * 1e6)
        if error is None:
            return seg.fail(self.ticket, retry=retry, delay_us=delay_us) is not None
        msg, tb = _message(error)[:MAX_ERROR], _summary(error) if isinstance(error, BaseException) else None
        body = errors.describe_error(type(error).__name__, msg, tb)
        if len(body) > self.queue._request_room - REPORT_ROOM:  # a request area set very small
            body = errors.describe_error(type(error).__name__[:100], msg[:100], None)
        return self._send((self.id, self.ticket.slot, self.attempt, protocol.ERROR, 1 if retry else 0, delay_us, body))

    def current(self) -> bool:
        """Whether this attempt still counts: not cancelled, not timed out,
        not handed to another worker after its lease ran out."""
        if self.queue.seg is not self.seg:
            return False
        s = self.seg.get(self.id)
        return s is not None and s.state == shm.RUNNING and s.attempt == self.attempt

    @property
    def cancelled(self) -> bool:
        """True once this attempt no longer counts (see :meth:`current`):
        a long task should check it and stop."""
        return not self.current()

    def progress(self, fraction: float) -> bool:
        """Report how far along this attempt is (0..1), for ``q.get`` and stats."""
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise errors.InvalidArgument(f"progress must be a fraction in 0..1, got {fraction!r}")
        seg = self.queue.seg
        return seg is self.seg and seg.progress(self.ticket, fraction)

    def heartbeat(self) -> bool:
        """Renew this attempt's lease; False if it was fenced."""
        seg = self.queue.seg
        return seg is self.seg and seg.heartbeat(self.ticket, self._lease_until())

    def _lease_until(self) -> int:
        return now_us() + int(self.queue.settings.lease * 1e6)

    def __repr__(self) -> str:
        return f"<ClaimedJob {self.id} {self.name} attempt {self.attempt}>"


def claim(q: "Queue", max: int, timeout: Optional[float], start: bool = True) -> List[ClaimedJob]:
    """Claim up to `max` best pending tasks, waiting up to `timeout` seconds.
    With `start`, their deadlines count from now; else from each job's start()."""
    if not isinstance(max, int) or isinstance(max, bool) or not 1 <= max <= 1 << 20:
        raise errors.InvalidArgument(f"max must be an int in 1..{1 << 20}, got {max!r}")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                or not timeout >= 0):
        raise errors.InvalidArgument(f"timeout must be None or seconds >= 0, got {timeout!r}")
    return _claim(q, max, timeout, start)


def _claim(q: "Queue", max: int, timeout: Optional[float], start: bool) -> List[ClaimedJob]:
    """:func:`claim` of arguments known to be good."""
    lease_us = int(q.settings.lease * 1e6)
    q._define()
    deadline = None if timeout is None else time.monotonic() + timeout
    next_check = time.monotonic() + IDLE_CHECK
    buf = _tickets(q, max)
    while True:
        seg = q.seg
        seen = seg.event(shm.EV_PENDING)
        _, n = seg.pop_batch(max, now_us() + lease_us, buf, start=start)
        if n:
            return _jobs(q, shm.unpack_tickets(buf, n), start, buf)
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return []
        if now >= next_check:
            next_check = now + IDLE_CHECK
            q._refresh()
            continue
        wait = IDLE_CHECK if deadline is None else min(IDLE_CHECK, deadline - now)
        seg.wait(shm.EV_PENDING, seen, wait)


def _tickets(q: "Queue", n: int) -> Any:
    cache: Dict[int, Any] = q.__dict__.setdefault("_ticket_bufs", {})
    buf = cache.get(n)
    if buf is None:
        buf = cache[n] = shm.Segment.tickets(n)
    return buf


def _jobs(q: "Queue", tickets: List[Ticket], start: bool, buf: Any = None) -> List[ClaimedJob]:
    """The claimed jobs of `tickets` (buf[0:n]: the same, as the claim wrote them)."""
    # Most jobs come from the segment's job cache; SQLite has every one.
    rows = q.seg.cached_jobs(buf, len(tickets)) if buf is not None else [None] * len(tickets)
    missing = [t.id for t, row in zip(tickets, rows) if row is None]
    if missing:
        stored = q.reader.jobs(missing)
        rows = [stored.get(t.id) if row is None else row for t, row in zip(tickets, rows)]
    policies: Dict[str, Any] = {}
    jobs: List[ClaimedJob] = []
    # Submitted by name before any worker defined the task: this worker's
    # definition fills in the limits, one locked call per (policy, attempt base).
    adopt: Dict[Tuple[int, int, int], List[int]] = {}
    unreadable: List[Tuple[ClaimedJob, Exception]] = []
    pickled = SERIALIZERS["pickle"]
    refuse_pickle = q._untrusted(pickled)
    # A limit counts from the attempts used before the task was last put
    # back from dead: fewer than its attempt number, so none for a first attempt.
    again = [t.id for t, row in zip(tickets, rows) if t.attempt > 1 and row is not None]
    bases = q.reader.attempt_bases(again) if again else {}
    for k, t in enumerate(tickets):
        row = rows[k]
        if row is None:  # cannot happen: a task reaches the segment only after its commit
            print(f"headrace worker: task {t.id} is not in the database; sending it back", file=sys.stderr)
            q.seg.finish(t, shm.PENDING)
            continue
        name, ser, created, body, max_attempts, timeout_ms = row
        if max_attempts:
            max_attempts += bases.get(t.id, 0)
        else:
            policy = policies.get(name)
            if policy is None:
                task = q.tasks.get(name)
                policy = policies[name] = task.policy() if task else (q.DEFAULT_MAX_ATTEMPTS, 0, 0)
            max_attempts, timeout_ms, backoff = policy
            max_attempts += bases.get(t.id, 0)
            adopt.setdefault((max_attempts, timeout_ms, backoff), []).append(k)
        job = ClaimedJob(q, t, name, (), {}, max_attempts, created, ser, timeout_ms)
        try:
            if ser == pickled and refuse_pickle:
                q._refuse_untrusted(ser, f"the payload of task {job.id} ({name!r})")
            job.args, job.kwargs = loads(ser, body)
        except Exception as e:
            unreadable.append((job, e))
            continue
        jobs.append(job)
    if adopt:
        _adopt(q, tickets, buf, adopt)
        if start:  # the claim started the others' clocks; it did not know these timeouts
            late = {tickets[k].id for idx in adopt.values() for k in idx}
            for job in jobs:
                if job.timeout_ms and job.id in late:
                    job.start()
    for job, e in unreadable:  # it can never run: dead, with the reason as its error
        print(f"headrace worker: task {job.id} ({job.name}): its payload cannot be read ({type(e).__name__}: "
              f"{_message(e)}); it is dead", file=sys.stderr)
        job.fail(e, retry=False)
    return jobs


def _adopt(q: "Queue", tickets: List[Ticket], buf: Any, groups: Dict[Tuple[int, int, int], List[int]]) -> None:
    """Fill in the unset limits of tickets[k] for the k of each policy's list."""
    seg = q.seg
    for (max_attempts, timeout_ms, backoff), idx in groups.items():
        if buf is not None and len(idx) == len(tickets):  # the usual case: the claim's own array
            arr = buf
        else:
            arr = shm.Segment.tickets(len(idx))
            for j, k in enumerate(idx):
                arr[j].id, arr[j].slot, arr[j].attempt = tickets[k]
        seg.adopt_batch(arr, len(idx), max_attempts, timeout_ms, backoff)


_local = threading.local()


def current_job() -> Optional[ClaimedJob]:
    """The job the calling task function is running as (None outside one):
    for ``.cancelled``, ``.progress()``, ``.heartbeat()``, ``.attempt``."""
    return getattr(_local, "job", None)


def execute(q: "Queue", job: ClaimedJob) -> bool:
    """Run one claimed job and report its outcome; True if it completed."""
    _local.job = job
    try:
        return _execute(q, job)
    finally:
        _local.job = None


def _execute(q: "Queue", job: ClaimedJob) -> bool:
    task = q.tasks.get(job.name)
    if task is None:
        err = errors.UnknownTask(f"no task named {job.name!r} is registered in this worker "
                                 f"(known: {', '.join(sorted(q.tasks)) or 'none'})")
        print(f"headrace worker: task {job.id}: {err}; it is dead", file=sys.stderr)
        job.fail(err, retry=False)
        return False
    try:
        result = task.fn(*job.args, **job.kwargs)
    except errors.Retry as e:
        job.fail(e, retry=True, delay=e.delay)
        return False
    except Exception as e:
        print(f"headrace worker: task {job.id} ({job.name}) attempt {job.attempt} failed: "
              f"{type(e).__name__}: {_message(e)}", file=sys.stderr)
        job.fail(e)
        return False
    try:
        job.complete(result)
    except (TypeError, ValueError) as e:  # a result that cannot be stored (NotSerializable, PayloadTooLarge)
        # fails the task for good
        print(f"headrace worker: task {job.id} ({job.name}): {e}", file=sys.stderr)
        job.fail(e, retry=False)
        return False
    return True


def _message(error: Any) -> str:
    """str(error), or a stand-in if its __str__ fails."""
    try:
        return str(error)
    except Exception as e:
        return f"<str() of this {type(error).__name__} failed: {type(e).__name__}>"


def _summary(error: BaseException) -> str:
    """The last frames of an error's traceback, bounded."""
    try:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__, limit=-8))
    except Exception:  # an exception whose __str__ fails, say
        text = "".join(traceback.format_tb(error.__traceback__, limit=-8))
    return text[-MAX_ERROR:]


class _Leases(threading.Thread):
    """Renews the leases of the jobs this worker holds, so that a lease only
    runs out when the worker is gone."""

    def __init__(self, q: "Queue") -> None:
        super().__init__(daemon=True, name="headrace-leases")
        self.q = q
        self.held: Dict[int, ClaimedJob] = {}
        self.lock = threading.Lock()
        self.quit = threading.Event()

    def hold(self, jobs: List[ClaimedJob]) -> None:
        with self.lock:
            for j in jobs:
                self.held[j.id] = j

    def drop(self, jobs: List[ClaimedJob]) -> None:
        with self.lock:
            for j in jobs:
                self.held.pop(j.id, None)

    def settle(self, timeout: float) -> None:
        """Before exit: wait (renewing their leases) until the writer settled
        the outcomes this worker sent, so that a finished job does not run
        again because its lease ran out while its report waited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                jobs = [j for j in self.held.values() if j.reported]
            if not any(j.current() for j in jobs):
                return
            time.sleep(0.01)

    def run(self) -> None:
        period = max(0.05, self.q.settings.lease / 3)
        while not self.quit.wait(period):
            with self.lock:
                jobs = list(self.held.values())
            for j in jobs:
                if not j.done and not j.heartbeat():  # settled, or fenced: nothing more to renew
                    self.drop([j])


def work(q: "Queue", stopping: Callable[[], bool], peers: int = 1) -> None:
    """Claim and run jobs until `stopping()`; jobs claimed but not started go back."""
    leases = _Leases(q)
    leases.start()
    batch = q.settings.claim_batch
    linger = q.settings.claim_linger
    claimed = -linger  # when this worker's last claim ended (monotonic)
    parent = os.getppid()
    q._hold_reports(True)  # one request per claimed batch, not one per result
    try:
        # A worker whose supervisor died (reparented) stops too.
        while not stopping() and os.getppid() == parent:
            pending = q.seg.pending_count()
            if pending < batch * peers:
                # Tasks trickling in one by one: claiming each as it comes
                # cost a wake-up, a claim, a payload read and an outcome
                # report apiece (end to end, 67-74 us of the workers' CPU per
                # task, against 19-33 us claiming at most once a
                # millisecond).  After a pause longer than the linger, the
                # first task is claimed at once.
                rest = claimed + linger - time.monotonic()
                if rest > 0:
                    time.sleep(rest)
                    pending = q.seg.pending_count()
            # Claim in batches, but leave a share of the pending work to the
            # `peers` other worker processes: a batch runs one job at a time,
            # so hoarding a short queue would idle them (and hold places of
            # limited groups before the jobs start).
            jobs = _claim(q, max(1, min(batch, pending // peers)), IDLE_CHECK, False)
            if jobs:
                claimed = time.monotonic()
            leases.hold(jobs)
            for i, job in enumerate(jobs):
                if stopping():
                    for rest in jobs[i:]:
                        q.seg.finish(rest.ticket, shm.PENDING)
                    break
                if job.timeout_ms and not job.start():
                    continue  # timed out or cancelled while it waited its turn
                execute(q, job)
            # Done ones are not renewed meanwhile; a reported one is, until the writer settles it.
            leases.drop([job for job in jobs if not job.reported])
            q._flush_reports()
    finally:
        q._hold_reports(False)
        leases.settle(SETTLE_WAIT)
        leases.quit.set()


class Supervisor:
    """Keeps `processes` worker processes running until SIGTERM or SIGINT,
    then drains: no new claims, running jobs finish within the grace period."""

    def __init__(self, q: "Queue", processes: int, grace: Optional[float] = None) -> None:
        if not isinstance(processes, int) or isinstance(processes, bool) or not 1 <= processes <= 1024:
            raise errors.InvalidArgument(f"processes must be an int in 1..1024, got {processes!r}")
        self.q = q
        self.n = processes
        self.grace = q.settings.grace if grace is None else grace
        self.children: Dict[int, int] = {}  # pid -> index
        self.stop = False
        self.replaced = 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop = True

    def run(self) -> int:
        sigs = {signal.SIGTERM, signal.SIGINT}
        # Signals stay blocked while children are forked; each child unblocks
        # them once its own handlers are in place.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        old = {s: signal.getsignal(s) for s in sigs}
        try:
            for i in range(self.n):
                self._spawn(i, old_mask)
            for s in sigs:
                signal.signal(s, self._on_signal)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        try:
            next_writer_check = 0.0
            while not self.stop:
                time.sleep(SUPERVISE_INTERVAL)
                self._reap(respawn=not self.stop, mask=old_mask)
                now = time.monotonic()
                if now >= next_writer_check:
                    next_writer_check = now + 0.5
                    try:
                        self.q._refresh()
                    except errors.WriterUnavailable as e:  # the workers wait for one; so do we
                        print(f"headrace: {e}; trying again", file=sys.stderr)
            self._drain()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return EXIT_OK

    def _spawn(self, index: int, mask: Any) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            self.children[pid] = index
            return
        code = EXIT_CRASHED
        try:
            flag = {"stop": False}

            def on_term(signum: int, frame: Any) -> None:
                flag["stop"] = True
            signal.signal(signal.SIGTERM, on_term)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.q._after_fork()
            work(self.q, lambda: flag["stop"], self.n)
            code = EXIT_OK
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _reap(self, respawn: bool, mask: Any = None) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if not done:
                continue
            index = self.children.pop(pid)
            if respawn:
                self.replaced += 1
                print(f"headrace: worker {index} (pid {pid}) died with status {status}; replacing it",
                      file=sys.stderr)
                self._spawn(index, mask)

    def _drain(self) -> None:
        for pid in self.children:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while self.children and time.monotonic() < deadline:
            time.sleep(0.02)
            self._reap(respawn=False)
        for pid in list(self.children):
            print(f"headrace: worker pid {pid} did not finish within {self.grace} s; killing it", file=sys.stderr)
            _signal(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.children.clear()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

