"""The public API: :class:`Queue`, task definitions, submits and inspection."""
from __future__ import annotations

import fcntl
import itertools
import json
import operator
import os
import pickle
import reprlib
import time
from array import array
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence,
                    Tuple, TypeVar, Union, overload)

import apsw

from . import config, errors, faults, paths, protocol, shm
from . import cron as cron_mod
from .shm import Segment, key_bytes
from .store import Reader, store_error

#: Seconds `Queue()` waits for a writer to come up (a rebuild of a large
#: backlog happens inside this window).
WRITER_START_TIMEOUT = 120.0
#: Seconds a waiting producer lets pass before it checks that the writer lives.
WRITER_CHECK_INTERVAL = 0.25
#: Longest task name.
MAX_NAME = 512
#: Most reported outcomes (results, errors) a worker holds before it sends
#: them in one request, and most bytes of them.
REPORT_BATCH = 256
REPORT_BYTES = 1 << 20
#: Seconds between a worker's reports of its task definitions to the writer.
DEFINE_INTERVAL = 5.0
#: submit_batch sends a chunk of plain jobs (no dedup key, no dependencies)
#: in parts of at most this many jobs, each as soon as it is serialised, so
#: that the writer stores one part while the next is being serialised.  The
#: first part is smaller, to start the writer sooner.
STREAM_PART = 256
STREAM_FIRST = 64
#: Jobs a batch needs before it is sent in parts.
STREAM_MIN = 2 * STREAM_PART
#: Running tasks whose progress :meth:`Queue.stats` reports.
STATS_RUNNING = 20
#: Most rows of each log (submit events, outcomes) one read of :meth:`Queue.events` takes.
EVENTS_BATCH = 500
STATS_AGREE_S = 2.0  # how long stats waits for the database and the segment to reach the same flush

SERIALIZERS = {"json": 0, "pickle": 1}
STATE_NAMES = shm.STATE_NAMES
_DEPS = operator.itemgetter(12)  # an item's depends_on
#: A job's options that, all unset, leave it differing from its neighbours
#: only in name, arguments and priority (see Queue._plain_frame).
_OPTIONS = operator.attrgetter("dedup_key", "max_attempts", "delay", "run_at", "group", "depends_on", "tags")
_NO_OPTIONS = {(None,) * 7}
_DEDUP_DEPS = operator.attrgetter("dedup_key", "depends_on")
_NO_DEDUP_DEPS = {(None, None)}
_NAME, _ARGS, _KWARGS, _PRIORITY = map(operator.attrgetter, ("name", "args", "kwargs", "priority"))
_ARGS_TYPES = {tuple, list}
_NO_KWARGS: Dict[str, Any] = {}

F = TypeVar("F", bound=Callable[..., Any])


class _Repr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:  # repr of a huge int is slow, or refused (sys.set_int_max_str_digits)
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 4, 120, 60, 120


def _short(value: Any, limit: int = 120) -> str:
    """A bounded repr of `value` for an error message (never raises: a value
    may be nested too deeply for repr, or its __repr__ may fail)."""
    try:
        r = _REPR.repr(value)
    except Exception:
        r = f"<{type(value).__name__} object>"
    return r if len(r) <= limit else r[:limit] + "..."


def _json_default(value: Any) -> Any:
    raise errors.NotSerializable(f"cannot serialise {_short(value)} (of type {type(value).__name__}) as JSON; "
                                 "pass JSON values, or open the queue with serializer='pickle' for trusted code")


def _json_encoder() -> Callable[[Any], str]:
    """json.dumps(value, separators=(",", ":"), default=_json_default, check_circular=False),
    with the C encoder built once instead of on every call as json does (a
    ~110-byte payload: 4.2 us that way, 2.2 us this way)."""
    try:
        from json.encoder import c_make_encoder, encode_basestring_ascii
    except ImportError:  # pragma: no cover - CPython always has _json
        c_make_encoder = None
    if c_make_encoder is None:  # pragma: no cover
        return json.JSONEncoder(separators=(",", ":"), default=_json_default, check_circular=False).encode
    # A cycle is caught as a RecursionError (no markers dict to keep per call).
    enc = c_make_encoder(None, _json_default, encode_basestring_ascii, None, ":", ",", False, False, True)
    join = "".join

    def encode(value: Any) -> str:
        return join(enc(value, 0))
    return encode


def _json_decoder() -> Callable[[str], Any]:
    """json.loads for str, calling the C scanner directly: JSONDecoder.decode
    runs two whitespace regexes around it (a third of a worker's decode
    time).  Anything but one bare JSON value (what we write) goes the
    ordinary way, so errors read the same."""
    from json.scanner import make_scanner
    decoder = json.JSONDecoder()
    scan, slow = make_scanner(decoder), decoder.decode

    def decode(text: str) -> Any:
        try:
            value, end = scan(text, 0)
        except StopIteration:
            return slow(text)
        return value if end == len(text) else slow(text)
    return decode


_JSON = _json_encoder()
_JSON_LOADS = _json_decoder()


def _json(what: str, value: Any) -> bytes:
    """`value` as JSON bytes; NotSerializable (a TypeError and a ValueError) says why it cannot be."""
    try:
        return _JSON(value).encode()
    except errors.NotSerializable:
        raise
    except RecursionError:
        why = "it is nested too deeply, or holds a reference to itself"
    except (TypeError, ValueError, OverflowError) as e:  # a non-str dict key, a cycle, an int too long
        why = str(e)
    raise errors.NotSerializable(f"cannot serialise {what} {_short(value)} as JSON: {why}") from None


def dumps(ser: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bytes:
    """Serialise a call's arguments; NotSerializable names a value that cannot be."""
    if ser == 0:
        return _json("the arguments", (args, kwargs))
    try:
        return pickle.dumps((tuple(args), dict(kwargs)), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise errors.NotSerializable(f"cannot pickle the arguments {_short((args, kwargs))}: {e}") from None


def dumps_value(ser: int, value: Any) -> bytes:
    """Serialise a task's return value; NotSerializable names one that cannot be."""
    if ser == 0:
        return _json("the return value", value)
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise errors.NotSerializable(f"cannot pickle the return value {_short(value)}: {e}") from None


def loads_value(ser: int, body: bytes) -> Any:
    if ser == 0:
        return _JSON_LOADS(body.decode())
    if ser == 1:
        return pickle.loads(body)
    raise ValueError(f"unknown serializer {ser!r}")


def loads(ser: int, body: bytes) -> Tuple[tuple, dict]:
    """The (args, kwargs) that :func:`dumps` wrote."""
    if ser == 0:
        args, kwargs = _JSON_LOADS(body.decode())
        return tuple(args), kwargs
    if ser == 1:
        return pickle.loads(body)
    raise ValueError(f"unknown serializer {ser!r}")


class Backoff:
    """How long a failed task waits before its next attempt.

    ``Backoff.constant(d)``, ``Backoff.linear(step, cap)`` (step × attempt)
    and ``Backoff.exponential(base, cap, jitter=False)`` (base × 2^(attempt-1));
    seconds, each delay capped by `cap`.  Full jitter draws the delay
    uniformly between 0 and that value.
    """

    __slots__ = ("kind", "base", "cap", "jitter")

    def __init__(self, kind: int, base: float, cap: Optional[float] = None, jitter: bool = False) -> None:
        for what, v in (("delay", base), ("cap", cap)):
            if v is None and what == "cap":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= shm.BO_MS_MAX / 1000:
                raise errors.InvalidArgument(f"backoff {what} must be seconds in 0..{shm.BO_MS_MAX // 1000}, "
                                             f"got {_short(v)}")
        self.kind, self.base, self.cap, self.jitter = kind, float(base), cap, bool(jitter)

    @classmethod
    def none(cls) -> "Backoff":
        """Retry at once (the default)."""
        return cls(shm.BO_NONE, 0.0)

    @classmethod
    def constant(cls, delay: float) -> "Backoff":
        return cls(shm.BO_CONSTANT, delay)

    @classmethod
    def linear(cls, step: float, cap: Optional[float] = None) -> "Backoff":
        return cls(shm.BO_LINEAR, step, cap)

    @classmethod
    def exponential(cls, base: float, cap: Optional[float] = None, jitter: bool = False) -> "Backoff":
        return cls(shm.BO_EXPONENTIAL, base, cap, jitter)

    def packed(self) -> int:
        """The policy as one int (what the database and the segment hold)."""
        kind = self.kind | (shm.BO_JITTER if self.jitter else 0)
        return shm.pack_backoff(kind, int(round(self.base * 1000)), int(round((self.cap or 0) * 1000)))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based)."""
        return shm.backoff_us(self.packed(), attempt, int.from_bytes(os.urandom(8), "little")) / 1e6

    def __repr__(self) -> str:
        name = {shm.BO_NONE: "none", shm.BO_CONSTANT: "constant", shm.BO_LINEAR: "linear",
                shm.BO_EXPONENTIAL: "exponential"}[self.kind]
        return f"Backoff.{name}(base={self.base}, cap={self.cap}, jitter={self.jitter})"


@dataclass
class Job:
    """One task to submit in a batch (see :meth:`Queue.submit_batch`)."""

    name: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    dedup_key: Optional[Union[str, bytes]] = None
    max_attempts: Optional[int] = None
    delay: Optional[float] = None
    run_at: Optional[Any] = None
    group: Optional[str] = None
    depends_on: Optional[Sequence[int]] = None
    tags: Optional[Mapping[str, str]] = None


class Outcome(NamedTuple):
    """What happened to one submitted job."""

    kind: str  # "inserted", "duplicate", "superseded" or "rejected"
    id: Optional[int]
    replaced: Optional[int] = None
    error: Optional[BaseException] = None


_INSERTED, _DUPLICATE, _SUPERSEDED, _REJECTED = (protocol.INSERTED, protocol.DUPLICATE, protocol.SUPERSEDED,
                                                 protocol.REJECTED)


class BatchOutcome:
    """Per-job outcomes of :meth:`Queue.submit_batch`, in input order.

    Kept as arrays; the :class:`Outcome` objects are built on first use of
    :attr:`outcomes`, so a large batch costs no object per job until asked."""

    def __init__(self, kinds: bytearray, ids: List[Optional[int]], others: List[int],
                 errors: Dict[int, BaseException]) -> None:
        self._kinds = kinds
        self._ids = ids
        self._others = others
        self._errors = errors
        self._outcomes: Optional[List[Outcome]] = None

    @property
    def outcomes(self) -> List[Outcome]:
        if self._outcomes is None:
            names = protocol.KIND_NAMES
            out = []
            for k, (kind, tid) in enumerate(zip(self._kinds, self._ids)):
                if kind == _REJECTED:
                    out.append(Outcome("rejected", None, error=self._errors[k]))
                elif kind == _SUPERSEDED:
                    out.append(Outcome("superseded", tid, replaced=self._others[k]))
                else:
                    out.append(Outcome(names[kind], tid))
            self._outcomes = out
        return self._outcomes

    def __len__(self) -> int:
        return len(self._kinds)

    def __iter__(self) -> Any:
        return iter(self.outcomes)

    @property
    def inserted(self) -> List[int]:
        """Ids of new tasks (superseding ones included)."""
        return [tid for kind, tid in zip(self._kinds, self._ids)
                if kind == _INSERTED or kind == _SUPERSEDED]  # type: ignore[misc]

    @property
    def duplicates(self) -> List[int]:
        """Ids of the live tasks that skipped jobs matched."""
        return [tid for kind, tid in zip(self._kinds, self._ids) if kind == _DUPLICATE]  # type: ignore[misc]

    @property
    def superseded(self) -> List[Tuple[int, int]]:
        """(new id, replaced id) pairs."""
        return [(self._ids[k], self._others[k]) for k, kind in enumerate(self._kinds)
                if kind == _SUPERSEDED]  # type: ignore[misc]

    @property
    def rejected(self) -> List[Tuple[int, BaseException]]:
        """(input index, error) pairs."""
        return sorted(self._errors.items())

    def __repr__(self) -> str:
        return (f"BatchOutcome(inserted={len(self.inserted)}, duplicates={len(self.duplicates)}, "
                f"superseded={len(self.superseded)}, rejected={len(self.rejected)})")


@dataclass(frozen=True)
class TaskInfo:
    """A task as :meth:`Queue.get` sees it."""

    id: int
    name: str
    state: str
    priority: int
    attempts: int
    max_attempts: int
    created: float
    started: Optional[float]
    finished: Optional[float]
    dedup: bool
    spilled: bool
    result: Any = None
    error: Optional[Dict[str, Any]] = None
    progress: Optional[float] = None
    run_at: Optional[float] = None


class Event(NamedTuple):
    """One state change from :meth:`Queue.events`.

    `kind` is "submitted", "batch_submitted" (ids `id` to `id + count - 1`:
    a batch's ids come one event per run of consecutive ids), "started",
    "failed" (an attempt failed; the task runs again), "retried" (put back
    from dead), "completed", "dead" or "cancelled".
    `cursor` resumes the stream just after this event."""

    kind: str
    id: int
    at: float
    attempt: int = 0
    count: int = 1
    cursor: Tuple[int, int] = (0, 0)


_OUTCOME_EVENTS = {shm.RUNNING: "started", shm.COMPLETED: "completed", shm.DEAD: "dead",
                   shm.CANCELLED: "cancelled", shm.PENDING: "failed", shm.DELAYED: "failed"}


class Task:
    """A function registered with :meth:`Queue.task`."""

    def __init__(self, queue: "Queue", fn: Callable[..., Any], name: str, priority: int,
                 max_attempts: int, backoff: Optional[Backoff] = None, timeout: Optional[float] = None) -> None:
        self.queue = queue
        self.fn = fn
        self.name = name
        self.priority = priority
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff.none()
        self.timeout = timeout
        #: (every in us, cron expression) of a periodic task; (0, "") otherwise.
        self.schedule: Tuple[int, str] = (0, "")
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function here and now."""
        return self.fn(*args, **kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> int:
        """Submit a call; returns the task id once it is durable."""
        return self.queue.submit(self.name, args=args, kwargs=kwargs, priority=self.priority,
                                 max_attempts=self.max_attempts)

    def policy(self) -> Tuple[int, int, int]:
        """(max_attempts, timeout in ms, packed backoff) as submits carry them."""
        return self.max_attempts, _timeout_ms(self.timeout), self.backoff.packed()


    def job(self, *args: Any, **kwargs: Any) -> Job:
        """A :class:`Job` for :meth:`Queue.submit_batch`."""
        return Job(self.name, args, kwargs, priority=self.priority, max_attempts=self.max_attempts)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


class Queue:
    """A durable task queue stored in SQLite at `path`, its live set in shared memory.

    Many processes may open the same path; they share one segment and one
    writer process, which the first of them starts.
    """

    #: Attempts a task gets unless its definition says otherwise.
    DEFAULT_MAX_ATTEMPTS = 3

    def __init__(self, path: Union[str, "os.PathLike[str]"], *, capacity: Optional[int] = None,
                 sync: str = "normal", serializer: str = "json", **tuning: Any) -> None:
        if serializer not in SERIALIZERS:
            raise errors.InvalidArgument(f"serializer must be 'json' or 'pickle', got {serializer!r}")
        if sync not in ("normal", "full"):
            raise errors.InvalidArgument(f"sync must be 'normal' or 'full', got {sync!r}")
        if capacity is not None:
            tuning["capacity"] = capacity
        if hasattr(tuning.get("retention"), "total_seconds"):  # a timedelta
            tuning["retention"] = tuning["retention"].total_seconds()
        self.settings = config.settings(**tuning)
        self._tuning = tuning
        self.sync = sync
        self.serializer = serializer
        self._ser = SERIALIZERS[serializer]
        # Every alias (relative, through symlinks) names one writer lock and
        # one segment.  Hard links are not supported, as in SQLite itself.
        self.path = os.path.realpath(os.fspath(path))
        self.tasks: Dict[str, Task] = {}
        self._names: Dict[str, Tuple[int, int, int]] = {}  # validated task names -> their submit policy
        self._max_payload = self.settings.max_payload
        self._seg: Optional[Segment] = None
        self._seg_ino = 0
        self._chunk_bytes = 0
        self._request_room = 0
        self._reader: Optional[Reader] = None
        self._clients_fd = -1
        shm.set_wait_spin(self.settings.wait_spin_us)  # per process
        self._open_files()
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    # ---- opening -----------------------------------------------------------------

    def _open_files(self) -> None:
        d = os.path.dirname(self.path)
        if not os.path.isdir(d):
            raise errors.StoreError(f"cannot open database {self.path}: directory {d} does not exist")
        try:
            os.close(paths.open_private(self.path))
            paths.check_sqlite_files(self.path)
            self._clients_fd = paths.open_private(paths.clients_path(self.path), strict=True)
        except errors.StoreError:
            raise
        except OSError as e:
            raise errors.StoreError(f"cannot open database {self.path}: {e.strerror or e}") from e
        # Blocks only while a writer finishes its final flush.
        fcntl.flock(self._clients_fd, fcntl.LOCK_SH)

    def _writer_args(self) -> List[str]:
        return ["--sync", self.sync, "--settings", json.dumps(self._tuning)]

    def _connect(self) -> None:
        """Attach to the segment of a live writer, starting one if needed."""
        deadline = time.monotonic() + WRITER_START_TIMEOUT
        spawned_at = -1e9
        pause = 0.002
        failed: Optional[errors.WriterUnavailable] = None
        while True:
            seg = self._try_attach()
            if seg is not None:
                # The old mapping is not closed here: another thread (a
                # worker's lease renewer) may be inside a call on it.  It is
                # unmapped once nothing refers to it.
                self._seg = seg
                self._seg_ino = os.stat(seg.path).st_ino
                # A chunk's request stays well under the area's half-size record limit.
                self._chunk_bytes = seg.info()["req_cap"] // 4
                # The largest request one record holds (a single job's, or a report's).
                self._request_room = seg.info()["req_cap"] // 2 - shm.REQ_HEADER
                return
            if not paths.writer_alive(self.path) and time.monotonic() - spawned_at > (5.0 if failed is None else 0.5):
                spawned_at = time.monotonic()
                try:
                    paths.spawn_writer(self.path, self._writer_args(), timeout=max(1.0, deadline - time.monotonic()))
                    failed = None
                except errors.WriterUnavailable as e:  # killed while starting, say: try again
                    failed = e
            if time.monotonic() > deadline:
                raise errors.WriterUnavailable(
                    f"no writer came up for {self.path} within {WRITER_START_TIMEOUT:.0f} s"
                    + (f" ({failed})" if failed else f"; see {paths.log_path(self.path)}"))
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _try_attach(self) -> Optional[Segment]:
        """The segment, if a writer serves it under the database's generation."""
        if not paths.writer_alive(self.path):
            return None
        try:
            gen = self.reader.meta_get("generation")
        except (apsw.SQLError, apsw.BusyError, apsw.CantOpenError):
            self._drop_reader()  # the schema is not there yet
            return None
        except apsw.Error as e:  # damaged under a running writer
            self._drop_reader()
            raise store_error(self.path, e) from e
        if gen is None:
            return None
        try:
            seg = Segment.attach(paths.segment_name(self.path))
        except errors.SegmentNotFound:
            return None
        if seg.generation != int(gen):
            seg.close()
            return None
        return seg

    @property
    def reader(self) -> Reader:
        if self._reader is None:
            self._reader = Reader(self.path)
        return self._reader

    def _drop_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    @property
    def seg(self) -> Segment:
        if self._seg is None:
            raise errors.EngineError(f"queue {self.path} is closed")
        return self._seg

    def _after_fork(self) -> None:
        """In a forked child: never touch the parent's SQLite connection."""
        _FORK_KEEP.append(self._reader)
        self._reader = None

    def close(self) -> None:
        """Detach; the last process to close lets the writer flush and exit."""
        if self._seg is not None:
            self._seg.close()
            self._seg = None
        self._drop_reader()
        if self._clients_fd >= 0:
            os.close(self._clients_fd)
            self._clients_fd = -1

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Queue {self.path}>"

    # ---- tasks ----------------------------------------------------------------------

    @overload
    def task(self, fn: F) -> Task: ...

    @overload
    def task(self, *, name: Optional[str] = None, priority: int = 0, max_attempts: Optional[int] = None,
             backoff: Optional[Backoff] = None, timeout: Optional[float] = None) -> Callable[[F], Task]: ...

    def task(self, fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None, priority: int = 0,
             max_attempts: Optional[int] = None, backoff: Optional[Backoff] = None,
             timeout: Optional[float] = None) -> Any:
        """Register a task function; its name is ``module.qualname`` unless `name` is given.

        `max_attempts` attempts in all (then the task is dead); `backoff`
        spaces the retries; `timeout` (seconds) is each attempt's processing
        deadline, after which the attempt counts as failed.  A submit from
        this process carries the policy with the task.
        """
        _check_priority(priority)
        attempts = self.DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts
        _check_attempts(attempts)
        if backoff is not None and not isinstance(backoff, Backoff):
            raise errors.InvalidArgument(f"backoff must be an engine.Backoff, got {_short(backoff)}")
        _timeout_ms(timeout)

        def register(f: Callable[..., Any]) -> Task:
            tname = name or f"{f.__module__}.{f.__qualname__}"
            _check_name(tname)
            t = Task(self, f, tname, priority, attempts, backoff, timeout)
            self.tasks[tname] = t
            self._names.pop(tname, None)
            self.__dict__["_define_next"] = 0.0  # tell the writer at the next claim
            return t
        return register(fn) if fn is not None else register

    def periodic(self, every: Optional[Any] = None, *, cron: Optional[str] = None, name: Optional[str] = None,
                 priority: int = 0, max_attempts: Optional[int] = None, backoff: Optional[Backoff] = None,
                 timeout: Optional[float] = None) -> Callable[[F], Task]:
        """Register a task that runs by itself, without arguments: every
        `every` (a timedelta or seconds) or on a `cron` schedule (five
        fields, UTC).  The writer submits exactly one run per tick, however
        many worker processes define it; a tick missed while nothing ran is
        made up once, not once per missed tick.  The schedule starts when a
        worker first claims with this definition."""
        sched = cron_mod.parse(every, cron)

        def register(f: Callable[..., Any]) -> Task:
            t = self.task(name=name, priority=priority, max_attempts=max_attempts, backoff=backoff,
                          timeout=timeout)(f)
            t.schedule = sched
            return t
        return register

    # ---- submitting ----------------------------------------------------------------------

    def submit(self, name: str, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None, *,
               priority: int = 0, dedup_key: Optional[Union[str, bytes]] = None, on_duplicate: str = "skip",
               max_attempts: Optional[int] = None, delay: Optional[float] = None, run_at: Optional[Any] = None,
               group: Optional[str] = None, depends_on: Optional[Sequence[int]] = None,
               tags: Optional[Mapping[str, str]] = None) -> int:
        """Submit one task; returns its id once it is committed.

        With a `dedup_key` that a live task holds: ``skip`` returns that
        task's id, ``supersede`` cancels it and inserts this one, ``reject``
        raises :class:`errors.DuplicateTask`.  `delay` (seconds) or `run_at`
        (a datetime or epoch seconds) keeps the task back until then.  Tasks
        of one `group` run at most :meth:`set_group_limit` at a time.  A task
        with `depends_on` (ids of tasks submitted before it) waits until all
        of them completed, and is cancelled if one ends dead or cancelled.
        `tags` (up to 32 str pairs) are for :meth:`find`, :meth:`count` and
        :meth:`cancel_tagged`.
        """
        mode = _mode(on_duplicate)
        now = shm.now_us()
        item = self._item(name, args, {} if kwargs is None else kwargs, priority, dedup_key, max_attempts, now,
                          _run_at_us(delay, run_at, now), group, depends_on, tags)
        if item[12]:
            self._check_parents([item])
        if mode <= 2 and protocol.plain(item) and not faults._armed:
            kind, tid = self._submit_plain(item, mode)
        else:
            item = (self.seg.reserve_ids(1),) + item[1:]
            kinds, flat = self._send_chunk([item], mode)  # one job: one chunk
            kind, tid = kinds[0], flat[0]
        if kind == _REJECTED:
            raise _duplicate(tid, name)
        return tid

    def _submit_plain(self, item: protocol.Item, mode: int) -> Tuple[int, int]:
        """Submit one plain job (no dedup key, group, dependency or tag) with
        one call that sends and waits (csrc/plain.h); (kind, id) of the answer."""
        _, name, body, ser, prio, _, run_at, max_attempts, _, created, timeout_ms, backoff = item[:12]
        bname = name.encode()
        try:
            sent = self.seg.submit_plain(mode, bname, body, prio, ser, run_at, created, max_attempts, timeout_ms,
                                         backoff, WRITER_CHECK_INTERVAL)
            if sent is None:  # the area is full: send once it has room
                pos, tid = self._with_room(lambda seg: seg.send_plain(mode, bname, body, prio, ser, run_at, created,
                                                                      max_attempts, timeout_ms, backoff))
                answer = None
            else:
                pos, tid, answer = sent
        except OverflowError:  # a field past the C types (names are checked before): the old way, from marshal
            kinds, flat = self._send_chunk([(self.seg.reserve_ids(1),) + item[1:]], mode)
            return kinds[0], flat[0]
        if answer is None:  # not answered yet: wait as for any request (the writer may have died)
            answer = self._await_answer(pos, plain=True)
        if answer is None:  # the segment was rebuilt under us: send again (the writer checks for a replay)
            kinds, flat = self._send_chunk([(tid,) + item[1:]], mode, replay=True)
            return kinds[0], flat[0]
        if isinstance(answer, tuple):
            return answer[0], answer[1]
        kinds, flat = protocol.decode_answer(answer)  # an error: raises
        return kinds[0], flat[0]

    def submit_batch(self, jobs: Iterable[Job], *, on_duplicate: str = "skip") -> BatchOutcome:
        """Submit many jobs: one transaction per chunk, one wake-up per chunk.

        A job that fails validation or serialisation is rejected on its own
        (its outcome carries the error); the others are submitted.
        """
        mode = _mode(on_duplicate)
        if not isinstance(jobs, Iterable):
            raise errors.InvalidType(f"submit_batch takes an iterable of engine.Job, got {_short(jobs)}")
        created = shm.now_us()
        bad: Dict[int, BaseException] = {}
        if jobs.__class__ in (list, tuple) and len(jobs) >= STREAM_MIN and _streamable(jobs):  # type: ignore[arg-type]
            return self._stream_batch(jobs, mode, created)  # type: ignore[arg-type]
        items, where = self._job_items(enumerate(jobs), created, bad)
        n = len(items) + len(bad)  # each job is in one or the other
        if any(map(_DEPS, items)):
            missing = self._missing_parents(items)
            for j in sorted(missing, reverse=True):
                bad[where[j]] = missing[j]
                del items[j], where[j]
        if not bad:  # the common case: outcomes line up with the input
            return BatchOutcome(*self._send_items(items, mode)) if items else BatchOutcome(bytearray(), [], [], {})
        kinds = bytearray([_REJECTED]) * n
        ids: List[Optional[int]] = [None] * n
        others = [0] * n
        if items:
            sk, si, so, se = self._send_items(items, mode)
            for j, k in enumerate(where):
                kinds[k], ids[k], others[k] = sk[j], si[j], so[j]
                if j in se:
                    bad[k] = se[j]
        return BatchOutcome(kinds, ids, others, bad)

    def _job_items(self, jobs: Iterable[Tuple[int, Any]], created: int, bad: Dict[int, BaseException]
                   ) -> Tuple[List[protocol.Item], List[int]]:
        """Items of the (index, job) pairs, and their indexes; a job that
        fails validation or serialisation goes into `bad` instead."""
        items: List[protocol.Item] = []
        where: List[int] = []
        item = self._item
        for k, job in jobs:
            try:
                if job.__class__ is not Job and not isinstance(job, Job):
                    raise errors.InvalidType(f"submit_batch takes engine.Job items, got {_short(job)}")
                kwargs = {} if job.kwargs is None else job.kwargs
                items.append(item(job.name, job.args, kwargs, job.priority, job.dedup_key, job.max_attempts, created,
                                  _run_at_us(job.delay, job.run_at, created)
                                  if job.delay is not None or job.run_at is not None else 0, job.group,
                                  job.depends_on, job.tags))
                where.append(k)
            except Exception as e:  # this job alone is rejected, whatever is wrong with it
                bad[k] = e if isinstance(e, (errors.EngineError, TypeError, ValueError)) else _wrapped(k, e)
        return items, where

    def _stream_batch(self, jobs: Sequence[Job], mode: int, created: int) -> BatchOutcome:
        """submit_batch of plain jobs, each chunk sent in parts as it is serialised."""
        n = len(jobs)
        kinds = bytearray([_REJECTED]) * n
        ids: List[Optional[int]] = [None] * n
        others = [0] * n
        bad: Dict[int, BaseException] = {}
        k = 0
        carry: Optional[Tuple[List[int], bytes]] = None
        while k < n or carry:
            k, carry, where, (kd, flat) = self._stream_chunk(jobs, k, carry, mode, created, bad)
            for j, w in enumerate(where):
                kinds[w], ids[w], others[w] = kd[j], flat[2 * j], flat[2 * j + 1]
        return BatchOutcome(kinds, ids, others, bad)

    def _stream_part(self, jobs: Sequence[Job], k: int, take: int, mode: int, created: int,
                     bad: Dict[int, BaseException]) -> Tuple[List[int], bytes]:
        """The indexes of the `take` jobs from `k` that are sent, and their
        frame (the others are in `bad`)."""
        frame = self._plain_frame(jobs[k:k + take], mode, created)
        if frame is not None:
            return list(range(k, k + take)), frame
        items, where = self._job_items(zip(range(k, k + take), jobs[k:k + take]), created, bad)
        if not items:
            return where, b""
        first = self.seg.reserve_ids(len(items))
        return where, protocol.encode_frame(mode, [(first + j,) + it[1:] for j, it in enumerate(items)])

    def _plain_frame(self, jobs: Sequence[Job], mode: int, created: int) -> Optional[bytes]:
        """The frame of jobs of one (known) name with no option set but their
        arguments and priority, serialised in one JSON call (csrc/plain.h);
        None for anything else, which goes job by job."""
        if self._ser or set(map(_OPTIONS, jobs)) != _NO_OPTIONS:
            return None
        names = set(map(_NAME, jobs))
        name = names.pop() if len(names) == 1 else None
        policy = self._names.get(name) if name.__class__ is str else None  # a name checked before
        prios = list(map(_PRIORITY, jobs))
        kwargs = list(map(_KWARGS, jobs))
        args = list(map(_ARGS, jobs))
        # Exact types only: a bool priority is refused, and an IntEnum or a
        # Mapping travels converted, by the job-by-job way.
        if policy is None or set(map(type, prios)) != {int} or any(kwargs) or \
                not set(map(type, kwargs)) <= {dict} or not set(map(type, args)) <= _ARGS_TYPES:
            return None
        try:
            text = _JSON(list(zip(args, itertools.repeat(_NO_KWARGS))))
            levels = bytes(prios)
        except Exception:  # the job-by-job way says which job, and why
            return None
        max_body = min(self._max_payload, max(0, self._request_room - (1 << 20)))
        return protocol.plain_frame(mode, name.encode(), self.seg.reserve_ids(len(jobs)), created, policy, 0, levels,
                                    text.encode(), max_body)

    def _stream_chunk(self, jobs: Sequence[Job], k: int, carry: Optional[Tuple[List[int], bytes]],
                      mode: int, created: int, bad: Dict[int, BaseException]) -> Any:
        """Send one chunk of jobs from `k` (after the `carry` part, built but
        not sent) as one record written in parts, and wait for its answer.
        Returns (next k, a part that did not fit, the indexes of the jobs
        sent, (kinds, flat ids))."""
        n, limit = len(jobs), self.settings.chunk
        if carry is None:
            take = min(STREAM_FIRST, n - k, limit)
            where, frame = self._stream_part(jobs, k, take, mode, created, bad)
            k += take
        else:
            where, frame = carry
        if len(frame) + 64 > self._request_room:  # too big for any record: sent the plain way, split by bytes
            kd, tids, others, _ = self._send_items(_frame_items(frame), mode)
            flat = array("q", [0]) * (2 * len(where))
            flat[0::2], flat[1::2] = array("q", tids), array("q", others)  # type: ignore[arg-type]
            return k, None, where, (kd, flat)
        most = min(limit, n - k + len(where))  # jobs this chunk may hold
        per = len(frame) / len(where) if where else 256.0
        room = min(self._request_room, max(int(per * most * 1.25) + 4096, len(frame) + 64))
        seg = self.seg
        pos = self._reserve(room, most)
        frames: List[bytes] = []
        sent_at: List[int] = []
        off = 0
        carry = None
        step = STREAM_FIRST
        try:
            while True:
                if where:
                    if off + len(frame) > room:  # the record is full: this part starts the next chunk
                        carry = (where, frame)
                        break
                    seg.req_write(pos, frame, off)
                    off += len(frame)
                    frames.append(frame)
                    sent_at += where
                    seg.req_stream(pos, off)
                    if faults._armed and len(sent_at) == len(where):
                        faults.point("chunk_write")
                if k >= n or len(sent_at) >= limit:
                    break
                step = min(STREAM_PART, step * 2)
                per = off / len(sent_at) if sent_at else per  # bytes a job took: keep the part within the room left
                take = min(step, n - k, limit - len(sent_at), max(1, int((room - off) / per)))
                where, frame = self._stream_part(jobs, k, take, mode, created, bad)
                k += take
            if not sent_at:  # every job of it was rejected
                seg.req_set_state(pos, shm.REQ_ABANDONED)
                return k, carry, sent_at, (b"", array("q"))
            seg.req_publish(pos, off)
        except BaseException:
            seg.req_set_state(pos, shm.REQ_ABANDONED)  # the writer drops what it did with it
            raise
        faults.point("chunk_sent")
        answer = self._await_answer(pos)
        if answer is None:  # the segment was rebuilt under us: send it again, whole
            return k, carry, sent_at, self._send_chunk(_frame_items(b"".join(frames)), mode | protocol.REPLAY)
        return k, carry, sent_at, protocol.decode_answer(answer)

    def _item(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any], priority: int,
              dedup_key: Optional[Union[str, bytes]], max_attempts: Optional[int], created: int,
              run_at: int = 0, group: Optional[str] = None, depends_on: Optional[Sequence[int]] = None,
              tags: Optional[Mapping[str, str]] = None) -> protocol.Item:
        if name.__class__ is not str:
            _check_name(name)
            name = str.__str__(name)  # a str subclass travels as a plain str
        policy = self._names.get(name)
        if policy is None:
            _check_name(name)
            t = self.tasks.get(name)
            # Not defined here: the writer fills in the limits from the
            # definitions that workers registered (protocol.UNSET).
            policy = t.policy() if t else (0, protocol.UNSET, protocol.UNSET)
            self._names[name] = policy
        default_attempts, timeout_ms, backoff = policy
        if priority.__class__ is not int or not 0 <= priority <= 255:
            _check_priority(priority)
            priority = int.__int__(priority)  # an int subclass (an IntEnum) travels as a plain int
        if max_attempts is None:
            max_attempts = default_attempts
        else:
            _check_attempts(max_attempts)
            max_attempts = int.__int__(max_attempts)
        if args.__class__ is not tuple and not isinstance(args, list):
            raise errors.InvalidType(f"args must be a tuple or list, got {_short(args)}")
        if kwargs.__class__ is not dict:
            if not isinstance(kwargs, Mapping):
                raise errors.InvalidType(f"kwargs must be a mapping, got {_short(kwargs)}")
            kwargs = dict(kwargs)
        if kwargs and not all(k.__class__ is str for k in kwargs):
            raise errors.InvalidType(f"kwargs keys must be str, got {_short(list(kwargs))}")
        body = dumps(self._ser, args, kwargs)
        if len(body) > self._max_payload:
            raise errors.PayloadTooLarge(f"the payload of {_short(name)} is {len(body)} bytes; "
                                         f"the limit is {self._max_payload} (setting max_payload)")
        dedup = None
        if dedup_key is not None:
            if not isinstance(dedup_key, (str, bytes)):
                raise errors.InvalidArgument(f"dedup_key must be str or bytes, got {_short(dedup_key)}")
            dedup = key_bytes(name, dedup_key)
        if group is not None:
            group = _check_group(group)
        deps = _check_deps(depends_on) if depends_on is not None else None
        pairs = _check_tags(tags) if tags is not None else None
        item = (0, name, body, self._ser, priority, dedup, run_at, max_attempts, group, created, timeout_ms, backoff,
                deps, pairs)
        if len(body) > self._request_room - (1 << 20) and _request_size(item) > self._request_room:
            raise errors.PayloadTooLarge(
                f"the request for {_short(name)} is {_request_size(item)} bytes (its payload {len(body)}); "
                f"the request area takes at most {self._request_room} (setting request_bytes)")
        return item

    def _missing_parents(self, items: List[protocol.Item]) -> Dict[int, BaseException]:
        """Items whose depends_on names a task that does not exist, by index."""
        wanted = sorted({p for it in items if it[12] for p in it[12]})
        known = self.reader.last_states(wanted)
        out: Dict[int, BaseException] = {}
        for j, it in enumerate(items):
            gone = [p for p in it[12] or () if p not in known]
            if gone:
                out[j] = errors.InvalidArgument(
                    f"depends_on names task {gone[0]}, which does not exist; a task can only depend on tasks "
                    "submitted before it (so dependencies never form a cycle)")
        return out

    def _check_parents(self, items: List[protocol.Item]) -> None:
        missing = self._missing_parents(items)
        if missing:
            raise missing[min(missing)]

    def _send_items(self, items: List[protocol.Item], mode: int
                    ) -> Tuple[bytearray, List[Optional[int]], List[int], Dict[int, BaseException]]:
        """Assign ids and send in chunks: (kinds, ids, replaced ids, errors by index)."""
        seg = self.seg
        first = seg.reserve_ids(len(items))
        items = [(first + k,) + it[1:] for k, it in enumerate(items)]
        kinds = bytearray()
        ids: List[Optional[int]] = []
        others: List[int] = []
        errs: Dict[int, BaseException] = {}
        limit = self._chunk_bytes
        start = 0
        while start < len(items):
            end, size = start, 0
            while end < len(items) and end - start < self.settings.chunk and (end == start or size < limit):
                size += len(items[end][2]) + len(items[end][1]) + 64
                end += 1
            if end > start + 1 and size > limit:
                end -= 1
            k, flat = self._send_chunk(items[start:end], mode)
            kinds += k
            chunk_ids: List[Optional[int]] = flat[0::2].tolist()
            chunk_others = flat[1::2].tolist()
            if _REJECTED in k:
                for j, kind in enumerate(k):
                    if kind == _REJECTED:
                        errs[start + j] = _duplicate(chunk_ids[j], items[start + j][1])  # type: ignore[arg-type]
                        chunk_ids[j] = None
            ids += chunk_ids
            others += chunk_others
            start = end
        return kinds, ids, others, errs

    def _send_chunk(self, items: List[protocol.Item], mode: int, replay: bool = False) -> Tuple[bytes, Any]:
        """One request, one transaction: the writer's (kinds, flat ids) answer
        (`replay`: it may have been stored before, in a segment since rebuilt)."""
        data = protocol.encode_request(mode | protocol.REPLAY if replay else mode, items)
        while True:
            if faults._armed:
                seg = self.seg
                pos = self._reserve(len(data), len(items))
                seg.req_write(pos, data[:len(data) // 2])
                faults.point("chunk_write")
                seg.req_write(pos, data)
                seg.req_publish(pos, len(data))  # a packed request is read to its exact end
            else:
                pos = self._send(data, len(items))
            faults.point("chunk_sent")
            answer = self._await_answer(pos)
            if answer is not None:
                return protocol.decode_answer(answer)
            # The segment was rebuilt under us: send again; the writer
            # checks which of these ids it already stored.
            data = protocol.encode_request(mode | protocol.REPLAY, items)

    def _reserve(self, nbytes: int, nitems: int) -> int:
        """Reserve a record for `nbytes` of request (and the answer to `nitems` jobs); its position."""
        need = max(nbytes, protocol.answer_room(nitems))
        return self._with_room(lambda seg: seg.req_reserve(need))

    def _send(self, data: bytes, nitems: int) -> int:
        """Publish a whole request (room for the answer to `nitems` jobs); its position."""
        need = protocol.answer_room(nitems)
        return self._with_room(lambda seg: seg.req_send(data, need))

    def _with_room(self, attempt: Callable[[Segment], Optional[int]]) -> int:
        """`attempt(seg)` again until the request area has room for it (a
        full area nudges the writer, which reclaims space as it answers)."""
        while True:
            seg = self.seg
            seen = seg.event(shm.EV_COMMIT)
            pos = attempt(seg)
            if pos is not None:
                return pos
            if not seg.wait(shm.EV_COMMIT, seen, WRITER_CHECK_INTERVAL):
                self._check_writer()

    def _await_answer(self, pos: int, plain: bool = False) -> Any:
        """The writer's answer to record `pos` (`plain`: a one-job request,
        as Segment.await_plain gives it), or None if the segment it is in was
        replaced (the request must go again)."""
        seg = self.seg
        try:
            while True:
                try:  # through self.seg: a reconnect may replace the mapping
                    data = (self.seg.await_plain if plain else self.seg.req_await)(pos, WRITER_CHECK_INTERVAL)
                except errors.InvalidState:
                    raise errors.WriterUnavailable(f"the writer dropped request {pos} of {self.path}") from None
                if data is not None:
                    return data
                if self._check_writer():
                    return None
        except BaseException:
            # Interrupted (a KeyboardInterrupt, say): give the record up, or
            # the answer nobody reads would keep the writer from reclaiming
            # any record after it while this process lives.  The submit may
            # or may not have been committed.  Through the mapping it was
            # sent on: a reconnect may have mapped the same segment again
            # (old mappings stay open; one of a rebuilt segment is dead memory).
            if not seg.closed:
                seg.give_up(pos)
            raise

    def _check_writer(self) -> bool:
        """Restart a dead writer and follow a rebuilt segment; True if the segment changed."""
        old = self.seg.generation
        self._refresh()
        return self.seg.generation != old

    def _refresh(self) -> None:
        """Restart a dead writer; follow a segment that was rebuilt."""
        if not paths.writer_alive(self.path) or not self._segment_current():
            self._connect()

    def _segment_current(self) -> bool:
        try:
            return os.stat(self.seg.path).st_ino == self._seg_ino
        except FileNotFoundError:
            return False

    # ---- workers ---------------------------------------------------------------------------

    def claim(self, max: int = 64, timeout: Optional[float] = 1.0) -> List[Any]:
        """Claim up to `max` tasks, waiting up to `timeout` seconds; [] if none came."""
        from .workers import claim
        return claim(self, max, timeout)

    def run_workers(self, processes: int = 1, *, grace: Optional[float] = None) -> int:
        """Run `processes` supervised worker processes until SIGTERM or SIGINT; returns 0."""
        from .workers import Supervisor
        return Supervisor(self, processes, grace=grace).run()

    # ---- inspection ------------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """Counts by state plus totals (completed counts flushed and unflushed work)."""
        # A finished task is counted by the database once the writer's flush
        # committed, and by the segment until that flush freed its slot (the
        # segment publishes the flush's sequence in the same lock hold).
        # Matching sequences mean both views split at the same flush; the
        # writer advances right after its commit, so a mismatch is short,
        # unless the writer died in between (then the counts are approximate).
        deadline, pause = time.monotonic() + STATS_AGREE_S, 0.0002
        while True:
            try:
                totals, seq = self.reader.counters_at_flush()
            except apsw.Error:
                totals, seq = {}, -1
            info = self.seg.info()
            if info["stats"]["flush_seq"] == seq or seq < 0 or time.monotonic() > deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        seg_counts = info["counts"]
        try:
            spilled = self.reader.spill_count()
        except apsw.Error:
            spilled = 0
        try:
            waiting = self.reader.waiting_count()
        except apsw.Error:
            waiting = 0
        counts = {
            "waiting": seg_counts["waiting"] + waiting,
            "pending": seg_counts["pending"] + spilled,
            "delayed": seg_counts["delayed"],
            "running": seg_counts["running"],
        }
        for s in ("completed", "dead", "cancelled"):
            counts[s] = totals.get(s, 0) + seg_counts[s]
        return {
            "counts": counts,
            "submitted": totals.get("submitted", 0),
            "spilled": spilled,
            "capacity": info["capacity"],
            "in_memory": info["capacity"] - info["free"],
            "unflushed": info["ring"],
            "claimed": info["stats"]["claimed"],
            "fenced": info["stats"]["fenced"],
            "expired": info["stats"]["expired"],
            "repairs": info["stats"]["repairs"],
            "generation": info["generation"],
            "writer_alive": paths.writer_alive(self.path),
            # Running tasks that reported progress: id -> fraction done.
            "progress": {r.id: r.progress / 1e6 for r in self.seg.running(STATS_RUNNING) if r.progress},
        }

    def get(self, tid: int) -> Optional[TaskInfo]:
        """What is known about task `tid`, or None if there is no such task.

        Its result is None while it has none, and also in a queue opened
        with JSON when the result is pickled (see :meth:`result`)."""
        # The segment first: a slot is freed only after its outcome is
        # committed, so a database read after it never misses that outcome.
        tid = _check_tid(tid)
        live = self.seg.get(tid)
        rec = self.reader.task(tid)
        if rec is None:
            return None
        hist = rec["history"]
        state = "pending"
        attempts = 0
        started = finished = None
        for attempt, st, at, _info in hist:
            attempts = max(attempts, attempt)
            state = STATE_NAMES[st]
            if st == shm.RUNNING:
                started = at / 1e6
            if st in shm.TERMINAL:
                finished = at / 1e6
        if live is None and state not in ("completed", "dead", "cancelled") and self.reader.is_waiting(tid):
            state = "waiting"
        progress = run_at = None
        base, reached = 0, None
        for _attempt, st, _at, info in hist:
            if st == shm.PENDING and info is not None:  # put back from dead after `info` attempts
                base, reached = info, None
            elif st == shm.DEAD and info:  # the limit it died at
                reached = info
        max_attempts = reached or base + (rec["max_attempts"] or self.DEFAULT_MAX_ATTEMPTS)
        if live is not None:
            state = live.state_name
            attempts = max(attempts, live.attempt)
            if live.state == shm.RUNNING:
                progress = live.progress / 1e6
            if live.state == shm.DELAYED:
                run_at = live.run_at / 1e6
            if live.max_attempts:
                max_attempts = live.max_attempts
        result = error = None
        for attempt, kind, body in rec["results"]:
            if kind == 1:
                error = errors.read_error(body)
            elif attempt == attempts and state == "completed":
                # A queue opened with JSON never unpickles (it runs code): the result stays None.
                if not self._untrusted(rec["serializer"]):
                    result = loads_value(rec["serializer"], body)
        return TaskInfo(id=tid, name=rec["name"], state=state, priority=rec["priority"], attempts=attempts,
                        max_attempts=max_attempts, created=rec["created"] / 1e6, started=started,
                        finished=finished, dedup=rec["dedup"] is not None,
                        spilled=rec["spilled"] and live is None, result=result, error=error,
                        progress=progress, run_at=run_at)

    def events(self, after: Tuple[int, int] = (0, 0), *, follow: bool = True,
               idle_timeout: Optional[float] = None) -> Iterator[Event]:
        """State changes as the database records them, oldest first, from
        any process: submits (``batch_submitted`` per run of consecutive ids
        of a batch chunk: usually one per chunk) and outcomes.  A one-by-one
        submit's event may come up to the setting ``event_delay`` late.
        Changes within one flush interval collapse into the last (a task
        that starts and completes between two flushes shows only
        ``completed``).  With `follow` it waits for more (until
        `idle_timeout` seconds pass without one); pass an event's `cursor`
        as `after` to resume."""
        seq, rowid = after
        idle_since = time.monotonic()
        while True:
            subs, outs = self.reader.events_after(seq, rowid, EVENTS_BATCH)
            batch: List[Event] = []
            for s_seq, kind, tid, n, at in subs:
                seq = s_seq
                batch.append(Event("submitted" if kind == protocol.EV_SUBMITTED else "batch_submitted", tid,
                                   at / 1e6, 0, n, (s_seq, -1)))  # cursor: its own place, set below
            for r, tid, attempt, state, at, info in outs:
                rowid = r
                kind = _OUTCOME_EVENTS.get(state, "")
                if state == shm.PENDING and info is not None:
                    kind = "retried"
                elif kind == "failed" and attempt == 0:
                    continue  # not an attempt's end
                batch.append(Event(kind, tid, at / 1e6, attempt, 1, (-1, r)))
            batch.sort(key=lambda e: e.at)
            # An event's cursor lies below every event after it in this order:
            # resuming from it skips nothing (it may repeat a few).
            cursors = []
            cur_seq, cur_row = seq, rowid
            for e in reversed(batch):
                cursors.append((cur_seq, cur_row))
                own_seq, own_row = e.cursor
                if own_seq >= 0:
                    cur_seq = min(cur_seq, own_seq - 1)
                if own_row >= 0:
                    cur_row = min(cur_row, own_row - 1)
            for e, c in zip(batch, reversed(cursors)):
                yield e._replace(cursor=c)
            if batch:
                idle_since = time.monotonic()
                continue
            if not follow or (idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout):
                return
            time.sleep(0.05)  # nothing new: poll at 20 Hz, not in a tight loop

    def set_group_limit(self, group: str, limit: Optional[int]) -> None:
        """Run at most `limit` tasks of `group` at once, across every worker
        process (None or 0: no limit).  Other groups are not held up while
        the backlog fits in the segment (see the README for the gap beyond)."""
        group = _check_group(group)
        if limit is None:
            limit = 0
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit < 1 << 31:
            raise errors.InvalidArgument(f"a group limit must be None or an int >= 0, got {_short(limit)}")
        self._command("group_limit", (group, int.__int__(limit)))

    def cancel_group(self, group: str) -> int:
        """Cancel every task of `group` that has not ended; returns how many."""
        return self._command("cancel_group", (_check_group(group),))[0]

    def find(self, tags: Optional[Mapping[str, str]] = None, state: Optional[str] = None,
             limit: int = 1000) -> List[int]:
        """Ids of tasks carrying every one of `tags`, in `state` if given, oldest first."""
        pairs = _check_tags(tags or {})
        if not pairs:
            raise errors.InvalidArgument("find needs at least one tag")
        if state is not None and state not in STATE_NAMES[1:]:
            raise errors.InvalidArgument(f"state must be one of {', '.join(STATE_NAMES[1:])}, got {_short(state)}")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise errors.InvalidArgument(f"limit must be a positive int, got {_short(limit)}")
        ids = self.reader.tagged(pairs)
        if state is None:
            return ids[:limit]
        out = []
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            # The segment first: a slot is freed only after its outcome is
            # committed, so the database read after it never misses that outcome.
            live = {tid: self.seg.get(tid) for tid in part}
            stored = self.reader.last_states(part)
            for tid in part:
                if self._state_of(tid, stored.get(tid, 0), live[tid]) == state:
                    out.append(tid)
                    if len(out) >= limit:
                        return out
        return out

    def count(self, tags: Optional[Mapping[str, str]] = None, state: Optional[str] = None) -> int:
        """How many tasks carry every one of `tags` (in `state`, if given)."""
        return len(self.find(tags, state, limit=1 << 62))

    def cancel_tagged(self, tags: Mapping[str, str]) -> int:
        """Cancel every task carrying all of `tags` that has not ended; returns how many."""
        pairs = _check_tags(tags)
        if not pairs:
            raise errors.InvalidArgument("cancel_tagged needs at least one tag")
        return self._command("cancel_tagged", (pairs,))[0]

    def _state_of(self, tid: int, stored: int, live: Optional[shm.SlotInfo]) -> str:
        if live is not None:
            return live.state_name
        if stored == 0 or stored < shm.COMPLETED:
            return "waiting" if self.reader.is_waiting(tid) else STATE_NAMES[stored or shm.PENDING]
        return STATE_NAMES[stored]

    def cancel(self, tid: int) -> bool:
        """Cancel task `tid` if it has not ended; True if it was cancelled.

        A running attempt sees ``job.cancelled`` and its later outcome is ignored."""
        return bool(self._command("cancel", ([_check_tid(tid)],)))

    def verify(self) -> int:
        """Check the segment's invariants, the database's integrity, and that
        the two agree on every live task (after a flush; the writer checks).
        Raises SegmentCorrupt or StoreCorrupt naming the first problem;
        returns the number of live tasks checked."""
        self.seg.verify()
        try:
            return self._command("verify", ())[0]
        except errors.SubmitFailed as e:
            raise errors.StoreCorrupt(str(e).split(": ", 1)[-1]) from None

    # ---- results and management -------------------------------------------------------------

    def result(self, tid: int, timeout: Optional[float] = None) -> Any:
        """The return value of task `tid` once it completed, waiting up to
        `timeout` seconds (None: for ever).

        Raises :class:`errors.TaskFailed` (with the last error) if it ended
        dead or cancelled, :class:`errors.WaitTimeout` if it did not end in
        time, :class:`errors.TaskNotFound` if there is no such task.
        """
        tid = _check_tid(tid)
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                    or not timeout >= 0):
            raise errors.InvalidArgument(f"timeout must be None or seconds >= 0, got {_short(timeout)}")
        deadline = None if timeout is None else time.monotonic() + timeout
        known = False
        while True:
            seg = self.seg
            seen = seg.event(shm.EV_FINISH)
            live = seg.get(tid)
            if live is None or live.state in shm.TERMINAL:
                end = self.reader.ending(tid)
                if end is None and not known:
                    raise errors.TaskNotFound(f"no task {tid} in {self.path}")
                known = True
                state, attempt = (live.state, live.attempt) if live is not None else end[:2]
                if state in shm.TERMINAL:
                    return self._ended(tid, state, attempt)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise errors.WaitTimeout(f"task {tid} did not finish within {timeout} s")
            # A wake-up per finished task, and a periodic look in case it was
            # settled in a segment that has since been replaced.
            wait = 0.5 if deadline is None else min(0.5, deadline - now)
            if not seg.wait(shm.EV_FINISH, seen, wait):
                self._refresh()

    def _untrusted(self, ser: int) -> bool:
        """Whether a body stored with serializer `ser` is pickled while this
        queue was opened with JSON: unpickling runs code, so it is never loaded."""
        return ser == SERIALIZERS["pickle"] != self._ser

    def _refuse_untrusted(self, ser: int, what: str) -> None:
        """Raise UntrustedPayload if `what`, stored with serializer `ser`, must not be loaded here."""
        if self._untrusted(ser):
            raise errors.UntrustedPayload(
                f"{what} is pickled, and this queue was opened with serializer={self.serializer!r}; unpickling "
                "runs code, so only a queue opened with serializer='pickle' (for trusted producers) loads it")

    def _ended(self, tid: int, state: int, attempt: int) -> Any:
        end = self.reader.ending(tid)
        ser = end[4] if end else self._ser
        if state == shm.COMPLETED:
            body = self.reader.result_of(tid, attempt)
            if body is None:
                return None
            self._refuse_untrusted(ser, f"the result of task {tid}")
            return loads_value(ser, body)
        err = errors.read_error(self.reader.last_error(tid))
        what = STATE_NAMES[state]
        detail = f": {err['type']}: {err['message']}" if err else ""
        raise errors.TaskFailed(f"task {tid} ended {what}{detail}", tid, what, err)

    def dead_letters(self, limit: int = 100) -> List[TaskInfo]:
        """Dead tasks, the most recent first."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise errors.InvalidArgument(f"limit must be a positive int, got {_short(limit)}")
        self._command("sync", ([],))  # outcomes reported so far are on disk
        out = []
        for tid, *_ in self.reader.dead(limit):
            info = self.get(tid)
            if info is not None:
                out.append(info)
        return out

    def retry_dead(self, tid: Union[int, Iterable[int]]) -> List[int]:
        """Put dead tasks back to pending with as many attempts again as they
        were first given; returns the ids that were dead and now are not."""
        ids = [_check_tid(t) for t in ([tid] if isinstance(tid, int) or not isinstance(tid, Iterable) else tid)]
        if not ids:
            return []
        return self._command("retry_dead", (ids,))

    def retry_all_dead(self) -> List[int]:
        """:meth:`retry_dead` for every dead task."""
        self._command("sync", ([],))
        done: List[int] = []
        while True:
            batch = [t for t, *_ in self.reader.dead(10_000)]
            if not batch:
                return done
            got = self._command("retry_dead", (batch,))
            done += got
            if not got:
                return done

    def _command(self, name: str, args: tuple) -> List[int]:
        """Run a management command in the writer; the ids it applied to."""
        data = protocol.encode_manage(name, args)
        while True:
            seg = self.seg
            pos = self._reserve(len(data), max(1, len(args[0]) if args and isinstance(args[0], list) else 1))
            seg.req_write(pos, data)
            seg.req_publish(pos)
            answer = self._await_answer(pos)
            if answer is not None:
                _, flat = protocol.decode_answer(answer)
                return flat[0::2].tolist()

    def _define(self) -> None:
        """Tell the writer this process's task definitions (their retry
        limits, timeouts and backoff), once per change: tasks submitted by
        name from elsewhere get them."""
        now = time.monotonic()
        if now < self.__dict__.get("_define_next", 0.0):
            return
        defs = [(t.name,) + t.policy() + t.schedule + (t.priority,) for t in self.tasks.values()]
        if defs:
            # Again every few seconds: a restarted writer learns who defines
            # what (periodic tasks fire only while a definer lives).
            self._command("define", (defs,))
        self.__dict__["_define_next"] = now + DEFINE_INTERVAL

    def _report(self, reports: List[protocol.Report]) -> None:
        """Hand attempt outcomes with data to the writer; no answer is awaited.

        Inside a worker loop they are held and sent together (one request
        per claimed batch, see :meth:`_flush_reports`)."""
        held = self.__dict__.get("_held_reports")
        if held is None:
            self._send_reports(reports)
            return
        held.extend(reports)
        self.__dict__["_held_bytes"] = self.__dict__.get("_held_bytes", 0) + sum(len(r[6]) for r in reports)
        if len(held) >= REPORT_BATCH or self.__dict__["_held_bytes"] >= REPORT_BYTES:
            self._flush_reports()

    def _hold_reports(self, on: bool) -> None:
        """Start (or stop, after sending what is held) holding reports."""
        if on:
            self.__dict__.setdefault("_held_reports", [])
        else:
            self._flush_reports()
            self.__dict__["_held_reports"] = None

    def _flush_reports(self) -> None:
        held = self.__dict__.get("_held_reports")
        if held:
            self.__dict__["_held_reports"] = []
            self.__dict__["_held_bytes"] = 0
            self._send_reports(held)

    def _send_reports(self, reports: List[protocol.Report]) -> None:
        # As few requests as fit the request area (each report fits on its own).
        room = self._request_room // 2
        start = 0
        while start < len(reports):
            end, size = start + 1, len(reports[start][6])
            while end < len(reports) and size + len(reports[end][6]) + 64 <= room:
                size += len(reports[end][6]) + 64
                end += 1
            data = protocol.encode_reports(reports[start:end])
            seg = self.seg
            pos = self._reserve(len(data), 1)
            seg.req_write(pos, data)
            seg.req_publish(pos)
            start = end


_FORK_KEEP: List[Any] = []


def _duplicate(tid: int, name: str) -> errors.DuplicateTask:
    """The error of a job refused because live task `tid` holds its dedup key."""
    err = errors.DuplicateTask(f"a live task {tid} of {name} holds this dedup key (on_duplicate='reject')")
    err.existing_id = tid  # type: ignore[attr-defined]
    return err


def _mode(on_duplicate: str) -> int:
    try:
        return protocol.ON_DUPLICATE[on_duplicate]
    except (KeyError, TypeError):
        raise errors.InvalidArgument(
            f"on_duplicate must be 'skip', 'supersede' or 'reject', got {_short(on_duplicate)}") from None


def _streamable(jobs: Sequence[Any]) -> bool:
    """Whether a batch may be sent in parts: Jobs only, none with a dedup
    key (last-wins needs the whole chunk) or dependencies."""
    try:  # at C speed in the usual case
        if set(map(type, jobs)) == {Job} and set(map(_DEDUP_DEPS, jobs)) == _NO_DEDUP_DEPS:
            return True
    except TypeError:  # an unhashable value (a list of dependencies)
        pass
    return all(j.__class__ is Job and j.dedup_key is None and not j.depends_on for j in jobs)


def _frame_items(frames: bytes) -> List[protocol.Item]:
    """The items that frames (of parts of a request) carry."""
    return [it for _, items in protocol.decode_frames(frames) for it in items]


def _check_priority(priority: Any) -> None:
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 255:
        raise errors.InvalidArgument(f"priority must be an int in 0..255, got {_short(priority)}")


def _check_attempts(n: Any) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1_000_000:
        raise errors.InvalidArgument(f"max_attempts must be an int in 1..1000000, got {_short(n)}")


def _timeout_ms(timeout: Any) -> int:
    """A task timeout in seconds (None: none) as whole milliseconds."""
    if timeout is None:
        return 0
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0.001 <= timeout <= 4_000_000:
        raise errors.InvalidArgument(f"timeout must be None or seconds in 0.001..4000000, got {_short(timeout)}")
    return int(round(timeout * 1000))


def _run_at_us(delay: Any, run_at: Any, now: int) -> int:
    """When a task may first run, in us since the epoch (0: now)."""
    if delay is not None and run_at is not None:
        raise errors.InvalidArgument("pass delay or run_at, not both")
    if delay is not None:
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay <= 10**9:
            raise errors.InvalidArgument(f"delay must be seconds in 0..1e9, got {_short(delay)}")
        return now + int(delay * 1e6) if delay > 0 else 0
    if run_at is None:
        return 0
    if hasattr(run_at, "timestamp"):  # a datetime; a naive one is local time, as datetime says
        try:
            run_at = run_at.timestamp()
        except (TypeError, ValueError, OverflowError, OSError) as e:  # datetime.min in local time, say
            raise errors.InvalidArgument(f"run_at {_short(run_at)} has no timestamp: {e}") from None
    if not isinstance(run_at, (int, float)) or isinstance(run_at, bool) or not 0 <= run_at < 2**62 / 1e6:
        raise errors.InvalidArgument(f"run_at must be a datetime or epoch seconds, got {_short(run_at)}")
    at = int(run_at * 1e6)
    return at if at > now else 0


#: Most dependencies of one task, and most tags.
MAX_DEPS = 100_000
MAX_TAGS = 32
MAX_TAG_LEN = 256


def _check_deps(deps: Any) -> List[int]:
    if isinstance(deps, (str, bytes, Mapping)) or not isinstance(deps, Iterable):
        raise errors.InvalidArgument(f"depends_on must be a list of task ids, got {_short(deps)}")
    given = list(deps)
    for p in given:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 1 << 63:
            raise errors.InvalidArgument(f"depends_on must hold task ids (positive ints), got {_short(p)}")
    # Once each, as plain ints (an int subclass would not travel to the writer).
    out = list(dict.fromkeys(p if p.__class__ is int else int.__int__(p) for p in given))
    if len(out) > MAX_DEPS:
        raise errors.InvalidArgument(f"depends_on names {len(out)} tasks; at most {MAX_DEPS}")
    return out


def _check_tags(tags: Any) -> List[Tuple[str, str]]:
    if not isinstance(tags, Mapping):
        raise errors.InvalidArgument(f"tags must be a dict of str to str, got {_short(tags)}")
    if len(tags) > MAX_TAGS:
        raise errors.InvalidArgument(f"a task takes at most {MAX_TAGS} tags, got {len(tags)}")
    out = []
    for k, v in tags.items():
        for what, x in (("key", k), ("value", v)):
            if not isinstance(x, str) or not x or len(x) > MAX_TAG_LEN:
                raise errors.InvalidArgument(f"a tag {what} must be a non-empty str of at most {MAX_TAG_LEN} "
                                             f"characters, got {_short(x)}")
        out.append((_text("a tag key", k), _text("a tag value", v)))
    return sorted(out)


def _text(what: str, value: str) -> str:
    """`value` as a plain str that the database can store (UTF-8: no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidArgument(f"{what} must be valid Unicode text (no lone surrogates), "
                                     f"got {_short(value)}") from None
    return value if value.__class__ is str else str.__str__(value)


def _check_group(group: Any) -> str:
    if not isinstance(group, str) or not group or len(group) > MAX_NAME:
        raise errors.InvalidArgument(f"a group must be a non-empty str of at most {MAX_NAME} characters, "
                                     f"got {_short(group)}")
    return _text("a group", group)




def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise errors.InvalidArgument(f"a task name must be a non-empty str of at most {MAX_NAME} "
                                     f"characters, got {_short(name)}")
    _text("a task name", name)


def _request_size(item: protocol.Item) -> int:
    """Bytes of the request that carries `item` alone."""
    return len(protocol.encode_request(0, [item]))


def _wrapped(k: int, e: Exception) -> errors.InvalidArgument:
    out = errors.InvalidArgument(f"job {k} cannot be submitted: {type(e).__name__}: {e}")
    out.__cause__ = e
    return out


def _check_tid(tid: Any) -> int:
    if not isinstance(tid, int) or isinstance(tid, bool) or not 0 < tid < 1 << 63:
        raise errors.InvalidArgument(f"a task id must be a positive int, got {_short(tid)}")
    return int.__int__(tid)
