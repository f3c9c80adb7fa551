"""The shared-memory segment: Python owns the mapping, C owns the structures.

A segment is a file under ``/dev/shm`` (created 0600, whatever the umask),
mapped shared into every process that attaches.  The C core builds and
checks its structures in place; this module maps it, validates ownership and
turns C status codes into exceptions through :mod:`engine.errors`.

Times are integers in microseconds since the epoch (:func:`now_us`).
The request area (``req_*`` methods) carries submits from any number of
producer processes to the one writer, which answers each record in place.
Batch calls take and return cffi arrays, so the hot path builds no
per-item Python objects.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import mmap
import os
import re
import stat
import struct
import tempfile
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from . import errors
from ._core import ffi, lib
from .errors import check
from . import faults as _faults  # noqa: F401  (reads HEADRACE_FAULT once)

# States, flags and events, read from C once.
FREE: int = lib.HR_FREE
PENDING: int = lib.HR_PENDING
DELAYED: int = lib.HR_DELAYED
WAITING: int = lib.HR_WAITING
RUNNING: int = lib.HR_RUNNING
COMPLETED: int = lib.HR_COMPLETED
DEAD: int = lib.HR_DEAD
CANCELLED: int = lib.HR_CANCELLED
STATE_NAMES = ("free", "pending", "delayed", "waiting", "running", "completed", "dead", "cancelled")
TERMINAL = frozenset({COMPLETED, DEAD, CANCELLED})

EV_PENDING: int = lib.HR_EV_PENDING
EV_COMMIT: int = lib.HR_EV_COMMIT
EV_WRITER: int = lib.HR_EV_WRITER
EV_FINISH: int = lib.HR_EV_FINISH

F_DEDUP: int = lib.HR_F_DEDUP
#: Retry backoff kinds and the jitter flag (see :func:`pack_backoff`).
BO_NONE: int = lib.HR_BO_NONE
BO_CONSTANT: int = lib.HR_BO_CONSTANT
BO_LINEAR: int = lib.HR_BO_LINEAR
BO_EXPONENTIAL: int = lib.HR_BO_EXPONENTIAL
BO_JITTER: int = lib.HR_BO_JITTER
#: Largest backoff base or cap in ms that :func:`pack_backoff` holds (about 74 hours).
BO_MS_MAX = (1 << 28) - 1
#: Group indexes run from 1 to MAX_GROUPS - 1 (0: no group).
MAX_GROUPS: int = lib.HR_MAX_GROUPS
#: Set in an :meth:`Segment.expire` state when the attempt ran past its deadline.
TIMED_OUT = 0x80
MAX_CAPACITY: int = lib.HR_MAX_CAPACITY
LAYOUT_VERSION: int = lib.HR_LAYOUT_VERSION

# Request record states.  A producer reserves, writes and publishes (READY);
# the writer answers (ANSWERED); the producer reads the answer and marks the
# record DONE, or gives up on it (ABANDONED).  DONE, PAD and ABANDONED
# records are reclaimed by the writer.
REQ_RESERVED: int = lib.HR_REQ_RESERVED
REQ_READY: int = lib.HR_REQ_READY
REQ_ANSWERED: int = lib.HR_REQ_ANSWERED
REQ_DONE: int = lib.HR_REQ_DONE
REQ_PAD: int = lib.HR_REQ_PAD
REQ_ABANDONED: int = lib.HR_REQ_ABANDONED
#: Bytes of a request record header; records are whole multiples of it.
REQ_HEADER = 32
#: Default size of the request area; a power of two in REQ_MIN..REQ_MAX.
DEFAULT_REQ_BYTES = 64 << 20
REQ_MIN: int = lib.HR_REQ_MIN
REQ_MAX: int = lib.HR_REQ_MAX

#: Where segments live; /dev/shm keeps them in memory on Linux.
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
#: Prefix of every segment file, so that stray files are easy to spot.
PREFIX = "headrace-"
#: How long attach waits for a creator that is still initialising.
ATTACH_WAIT_S = 2.0

#: A 16-byte dedup key as its two 64-bit halves.
_KEY = struct.Struct("<QQ")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_MIN_MAP = 64  # below this, nothing in the file could be a header
#: Bytes past the core's part of a segment file that say whom it serves
#: (see :func:`read_note`); the core never reads them.
NOTE_SIZE = 4096
_NOTE = struct.Struct("<8sI")
_NOTE_MAGIC = b"HRNOTE1\0"
#: The longest note.
NOTE_MAX = NOTE_SIZE - _NOTE.size


def now_us() -> int:
    """The current wall-clock time in microseconds since the epoch."""
    return time.time_ns() // 1000


def key_bytes(queue: str, key: Union[str, bytes]) -> bytes:
    """The 128-bit dedup key of (queue, key), as 16 bytes (lo then hi, little-endian)."""
    raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else bytes(key)
    q = queue.encode("utf-8", "surrogatepass")
    # Length-prefix the queue so ("ab", "c") and ("a", "bc") differ.
    return hashlib.blake2b(len(q).to_bytes(4, "little") + q + raw, digest_size=16).digest()


def split_key(key: bytes) -> Tuple[int, int]:
    """The (lo, hi) 64-bit halves of a 16-byte dedup key, as the C side takes them."""
    return _KEY.unpack(key)


def key_hash(queue: str, key: Union[str, bytes]) -> Tuple[int, int]:
    """The 128-bit dedup hash of (queue, key) as (lo, hi) 64-bit halves."""
    return split_key(key_bytes(queue, key))


class Ticket(NamedTuple):
    """A claimed attempt: what fences a later finish or heartbeat."""

    id: int
    slot: int
    attempt: int


#: hr_ticket: id, slot, attempt (native byte order, no padding).
_TICKET = struct.Struct("=QII")
assert _TICKET.size == ffi.sizeof("hr_ticket") and ffi.offsetof("hr_ticket", "attempt") == 12


#: Ticket((id, slot, attempt)) without the Python-level __new__ of a named tuple.
_ticket_of = functools.partial(tuple.__new__, Ticket)


def unpack_tickets(buf: Any, n: int) -> List[Ticket]:
    """Tickets of an ``hr_ticket[]`` array's first `n` entries, unpacked in C."""
    return list(map(_ticket_of, _TICKET.iter_unpack(ffi.buffer(buf, n * _TICKET.size))))


class SlotInfo(NamedTuple):
    """A snapshot of one slot."""

    slot: int
    id: int
    state: int
    prio: int
    seq: int
    attempt: int
    run_at: int
    lease_until: int
    group: int
    dedup: Optional[Tuple[int, int]]
    aux: int
    version: int
    dirty: bool
    max_attempts: int = 0
    deadline: int = 0
    timeout_ms: int = 0
    progress: int = 0
    backoff: int = 0

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]


class ReqHeader(NamedTuple):
    """A snapshot of one request record's header."""

    pos: int
    len: int
    state: int
    pid: int
    nbytes: int
    tag: int


_E_FULL: int = lib.HR_E_FULL
_E_NOT_FOUND: int = lib.HR_E_NOT_FOUND
_E_STATE: int = lib.HR_E_STATE
_E_STALE: int = lib.HR_E_STALE
#: The job cache's record header (hr_jc_rec) but for the id, position and length that C checked:
#: created, body_len, max_attempts, timeout_ms, name_len, ser.
_JC_REC = struct.Struct("<16xq4xIiIHB5x")
#: Bytes of a claim's copy of the job cache per ticket (a bigger record is read from the database).
JC_ROOM = 512
#: Task names a segment view keeps decoded.
JC_NAMES = 1024
#: ffi.new without the zero fill, for buffers that C writes before Python reads them.
_raw_new = ffi.new_allocator(should_clear_after_alloc=False)
#: An answer's wait that ended without one, to be waited again: timed out, or cut short by a signal.
_E_AGAIN = (lib.HR_E_TIMEOUT, lib.HR_E_INTERRUPTED)


def _slot_info(slot: int, r: Any) -> SlotInfo:
    dedup = (r.dedup_lo, r.dedup_hi) if r.flags & F_DEDUP else None
    return SlotInfo(slot, r.id, r.state, r.prio, r.seq, r.attempt, r.run_at, r.lease_until,
                    r.group, dedup, r.aux, r.version, bool(r.dirty), r.max_attempts, r.deadline,
                    r.timeout_ms, r.progress, pack_backoff(r.bo_kind, r.bo_base_ms, r.bo_cap_ms))


def segment_path(name: str, directory: Optional[str] = None) -> str:
    """The file that backs segment `name`."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise errors.InvalidArgument(f"bad segment name {name!r}: use 1-200 of [A-Za-z0-9._-]")
    return os.path.join(directory or SHM_DIR, PREFIX + name)


class Segment:
    """One mapped shared-memory segment.  Use :meth:`create` or :meth:`attach`."""

    def __init__(self, path: str, mm: mmap.mmap, size: int, fd: int = -1) -> None:
        self.path = path
        self._mm = mm
        #: The file, open with a shared flock while this view is mapped: a
        #: segment nobody holds is not in use (see paths.stale_segments).
        self._fd = fd
        self._buf = ffi.from_buffer(mm)
        self._mem = ffi.cast("void *", self._buf)
        self.size = size
        self._slot = ffi.new("hr_slot *")
        self._ticket = ffi.new("hr_ticket *")
        self._i32 = ffi.new("int32_t[1]")
        self._msg = ffi.new("char[]", 512)
        self._info = ffi.new("hr_info *")
        self._jc_names: Dict[bytes, str] = {}  # the job cache's task names, decoded
        # The buffers above are shared by every call on this object, and cffi
        # releases the GIL during a C call: methods that use them must not run
        # in two threads at once.  heartbeat (a lease thread), the id counter
        # and the req_* methods (producer threads) allocate per call instead.

    # ---- lifecycle -------------------------------------------------------

    @classmethod
    def create(cls, name: str, capacity: int, *, req_bytes: int = DEFAULT_REQ_BYTES,
               directory: Optional[str] = None, generation: Optional[int] = None,
               note: bytes = b"") -> "Segment":
        """Create and initialise a new segment of `capacity` slots (mode 0600).

        `req_bytes` sizes the request area (a power of two in 4 KiB..1 GiB);
        `generation` replaces the random generation number when given;
        `note` (at most NOTE_MAX bytes) is kept past the mapped part, for
        :func:`read_note`.
        """
        if not isinstance(note, bytes) or len(note) > NOTE_MAX:
            raise errors.InvalidArgument(f"note must be bytes of at most {NOTE_MAX}, "
                                         f"got {type(note).__name__} of {len(note) if isinstance(note, bytes) else '?'}")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or not 0 < capacity <= MAX_CAPACITY:
            raise errors.InvalidArgument(f"capacity must be an int in 1..{MAX_CAPACITY}, got {capacity!r}")
        if (not isinstance(req_bytes, int) or isinstance(req_bytes, bool) or not REQ_MIN <= req_bytes <= REQ_MAX
                or req_bytes & (req_bytes - 1)):
            raise errors.InvalidArgument(
                f"req_bytes must be a power of two in {REQ_MIN}..{REQ_MAX}, got {req_bytes!r}")
        if generation is not None and (not isinstance(generation, int) or isinstance(generation, bool)
                                       or not 0 <= generation < 1 << 64):
            raise errors.InvalidArgument(f"generation must be a 64-bit unsigned int, got {generation!r}")
        path = segment_path(name, directory)
        size = lib.hr_segment_size(capacity, req_bytes)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise errors.SegmentExists(f"segment {path} already exists") from None
        try:
            os.fchmod(fd, 0o600)  # the umask may have widened nothing, but be explicit
            os.ftruncate(fd, size + NOTE_SIZE)
            # Reserve the pages now: on a full tmpfs a mapped write would
            # raise SIGBUS later instead of an error here.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size + NOTE_SIZE)
            os.pwrite(fd, _NOTE.pack(_NOTE_MAGIC, len(note)) + note, size)
            fcntl.flock(fd, fcntl.LOCK_SH)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            _unlink_quiet(path)
            raise errors.SegmentError(f"cannot create segment {path} of {size} bytes: {e}") from e
        seg = cls(path, mm, size, fd)
        if generation is None:
            generation = int.from_bytes(os.urandom(8), "little") >> 1 or 1
        rc = lib.hr_init(seg._mem, size, capacity, req_bytes, os.geteuid(), generation)
        if rc < 0:
            seg.close()
            _unlink_quiet(path)
            check(rc, f"segment {path}")
        return seg

    @classmethod
    def attach(cls, name: str, *, directory: Optional[str] = None,
               wait: float = ATTACH_WAIT_S) -> "Segment":
        """Map an existing segment after checking owner, mode and header."""
        path = segment_path(name, directory)
        uid = os.geteuid()
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                raise errors.SegmentNotFound(f"no segment at {path}") from None
            except PermissionError as e:
                raise errors.SegmentPermission(f"segment {path}: {e.strerror}; it belongs to another user") from e
            except OSError as e:  # ELOOP for a symlink, among others
                raise errors.SegmentForeign(f"segment {path}: {e.strerror}; not a headrace segment") from e
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise errors.SegmentForeign(f"segment {path} is not a regular file")
                if st.st_uid != uid:
                    raise errors.SegmentPermission(
                        f"segment {path} is owned by uid {st.st_uid}, not {uid}; refusing to use it")
                if st.st_mode & 0o077:
                    raise errors.SegmentPermission(
                        f"segment {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600")
                size = st.st_size
                if size < _MIN_MAP:
                    raise errors.SegmentTruncated(f"segment {path} holds only {size} bytes; "
                                                  "delete it (headrace rebuilds it) and retry")
                fcntl.flock(fd, fcntl.LOCK_SH)
                # Removed as stale while we waited for the lock, or replaced by a rebuilt one: look again.
                if not _same_file(path, st):
                    os.close(fd)
                    continue
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                raise
            seg = cls(path, mm, size, fd)
            rc = lib.hr_attach(seg._mem, size, uid)
            if rc == lib.HR_E_NOT_READY and time.monotonic() < deadline:
                seg.close()
                time.sleep(0.005)
                continue
            if rc < 0:
                seg.close()
                check(rc, f"segment {path}")
            return seg

    @classmethod
    def open(cls, name: str, capacity: int, *, req_bytes: int = DEFAULT_REQ_BYTES,
             directory: Optional[str] = None) -> "Segment":
        """Attach to segment `name`, creating it with `capacity` and `req_bytes` if absent."""
        try:
            return cls.attach(name, directory=directory)
        except errors.SegmentNotFound:
            pass
        try:
            return cls.create(name, capacity, req_bytes=req_bytes, directory=directory)
        except errors.SegmentExists:
            return cls.attach(name, directory=directory)

    @staticmethod
    def unlink(name: str, *, directory: Optional[str] = None) -> bool:
        """Remove segment `name`; processes still attached keep their mapping."""
        return _unlink_quiet(segment_path(name, directory))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` unmapped this view."""
        return self._mm is None

    def close(self) -> None:
        """Unmap this process's view of the segment."""
        if self._mm is None:
            return
        self._mem = None
        ffi.release(self._buf)
        self._buf = None
        self._mm.close()
        self._mm = None  # type: ignore[assignment]
        self._release_file()

    def _release_file(self) -> None:
        """Close the file, which gives its shared flock back."""
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            try:
                os.close(fd)
            except OSError:
                pass

    # A view dropped without close() (a reconnect leaves the old one to
    # threads still inside calls on it) gives its file back once collected;
    # the mapping goes with the mmap object.
    __del__ = _release_file

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def generation(self) -> int:
        return int(lib.hr_generation(self._mem))

    @property
    def capacity(self) -> int:
        return self.info()["capacity"]

    # ---- allocation helpers for batch calls -------------------------------

    @staticmethod
    def tasks(n: int) -> Any:
        """A zeroed ``hr_task[n]`` array for :meth:`push_batch`."""
        return ffi.new("hr_task[]", n)

    @staticmethod
    def tickets(n: int) -> Any:
        """A ``hr_ticket[n]`` array for :meth:`pop_batch` and friends."""
        return ffi.new("hr_ticket[]", n)

    @staticmethod
    def statuses(n: int) -> Any:
        """An ``int32_t[n]`` array of per-item status codes."""
        return ffi.new("int32_t[]", n)

    @staticmethod
    def dirty_records(n: int) -> Any:
        """A ``hr_dirty[n]`` array for :meth:`peek_dirty`."""
        return ffi.new("hr_dirty[]", n)

    # ---- insert ----------------------------------------------------------

    def reserve_seq(self, n: int = 1) -> int:
        """Reserve `n` consecutive FIFO sequence numbers; returns the first."""
        out = ffi.new("uint64_t *")
        check(lib.hr_reserve_seq(self._mem, n, out), "reserve_seq")
        return int(out[0])

    def push(self, id: int, *, prio: int = 0, seq: int = 0, state: int = PENDING, run_at: int = 0,
             dedup: Optional[Tuple[int, int]] = None, group: int = 0, attempt: int = 0,
             aux: int = 0, max_attempts: int = 0, timeout_ms: int = 0, backoff: int = 0) -> int:
        """Insert one task; returns its slot."""
        t = self.tasks(1)
        fill_task(t[0], id, prio=prio, seq=seq, state=state, run_at=run_at, dedup=dedup,
                  group=group, attempt=attempt, aux=aux, max_attempts=max_attempts,
                  timeout_ms=timeout_ms, backoff=backoff)
        lib.hr_insert_batch(self._mem, t, 1, self._i32)
        return check(self._i32[0], f"push of task {id}")

    def push_batch(self, tasks: Any, n: Optional[int] = None, out: Any = None) -> Tuple[Any, int]:
        """Insert tasks[0:n]; returns (per-item slot-or-status array, inserted count)."""
        n = len(tasks) if n is None else n
        out = self.statuses(n) if out is None else out
        return out, check(lib.hr_insert_batch(self._mem, tasks, n, out), "push_batch")

    # ---- claim and finish -------------------------------------------------

    def pop(self, lease_until: int, now: Optional[int] = None) -> Optional[Ticket]:
        """Claim the best pending task, or None if there is none."""
        t = self._ticket
        if check(lib.hr_claim(self._mem, 1, now_us() if now is None else now, lease_until, 1, t), "pop") == 0:
            return None
        return Ticket(t.id, t.slot, t.attempt)

    def pop_batch(self, max: int, lease_until: int, out: Any = None, now: Optional[int] = None,
                  start: bool = True) -> Tuple[Any, int]:
        """Claim up to `max` best pending tasks; returns (tickets, count).

        With `start`, a task with a timeout gets a deadline of `now` plus its
        timeout, and its lease never runs past that deadline; without, the
        claimer starts each attempt's clock when it runs it (:meth:`clock`)."""
        out = self.tickets(max) if out is None else out
        now = now_us() if now is None else now
        return out, check(lib.hr_claim(self._mem, max, now, lease_until, 1 if start else 0, out), "pop_batch")

    def cached_jobs(self, tickets: Any, n: int) -> List[Optional[Tuple[str, int, int, bytes, int, int]]]:
        """For each claimed ticket of tickets[0:n], in order: its job as
        (name, ser, created, body, max_attempts as stored, timeout_ms), as
        Reader.jobs gives it, if the job cache still holds it
        (csrc/jobcache.h), else None (read it from the database)."""
        room = n * JC_ROOM
        out, at = _raw_new("char[]", room), _raw_new("int64_t[]", n)
        rows: List[Optional[Tuple[str, int, int, bytes, int, int]]] = [None] * n
        used = lib.hr_jc_read(self._mem, tickets, n, out, room, at)
        if not used:
            return rows
        data = ffi.buffer(out, used)[:]
        unpack, head, names = _JC_REC.unpack_from, _JC_REC.size, self._jc_names
        for k, off in enumerate(ffi.unpack(at, n)):
            if off < 0:
                continue
            created, body_len, max_attempts, timeout_ms, name_len, ser = unpack(data, off)
            start = off + head
            key = data[start:start + name_len]
            name = names.get(key)
            if name is None:
                name = key.decode()
                if len(names) < JC_NAMES:
                    names[key] = name
            start += name_len
            rows[k] = (name, ser, created, data[start:start + body_len], max_attempts, timeout_ms)
        return rows

    def finish(self, ticket: Ticket, state: int = COMPLETED, *, run_at: int = 0, aux: int = 0) -> bool:
        """Report one attempt's outcome; False if the attempt was fenced."""
        tid, slot, attempt = ticket
        rc = lib.hr_finish_one(self._mem, tid, slot, attempt, state, run_at, aux)
        if rc == 0:
            return True
        if rc != _E_STALE:
            check(rc, "finish")
        return False

    def finish_batch(self, tickets: Any, n: int, state: int = COMPLETED, *, run_at: int = 0,
                     aux: int = 0, out: Any = None) -> Tuple[Any, int]:
        """Report outcomes for tickets[0:n]; returns (per-item status array, applied count)."""
        out = self.statuses(n) if out is None else out
        rc = lib.hr_finish_batch(self._mem, tickets, n, state, run_at, aux, out)
        return out, check(rc, "finish_batch")

    def fail(self, ticket: Ticket, *, retry: bool = True, delay_us: int = -1, now: Optional[int] = None
             ) -> Optional[int]:
        """End a running attempt without success: dead once attempts are used
        up or `retry` is false, else pending, or delayed by `delay_us` (< 0:
        by the task's backoff).  Returns the new state, None if fenced."""
        t = ffi.new("hr_ticket *")
        t.id, t.slot, t.attempt = ticket
        rc = lib.hr_fail(self._mem, t, now_us() if now is None else now, 1 if retry else 0, delay_us)
        if rc == lib.HR_E_STALE:
            return None
        return check(rc, "fail")

    def adopt(self, ticket: Ticket, max_attempts: int, timeout_ms: int, backoff: int) -> bool:
        """Fill a running attempt's unset limits (max attempts, timeout,
        backoff: 0 in the slot) from the task's definition (a new timeout
        counts from :meth:`clock`).  False if the attempt was fenced."""
        t = ffi.new("hr_ticket *")
        t.id, t.slot, t.attempt = ticket
        return self.adopt_batch(t, 1, max_attempts, timeout_ms, backoff) == 1

    def adopt_batch(self, tickets: Any, n: int, max_attempts: int, timeout_ms: int, backoff: int,
                    out: Any = None) -> int:
        """:meth:`adopt` for tickets[0:n] under one lock (a claim's tasks of
        one name); returns how many were current (out[k]: 0, or HR_E_STALE)."""
        kind, base, cap = unpack_backoff(backoff)
        return check(lib.hr_adopt(self._mem, tickets, n, max_attempts, timeout_ms, kind, base, cap,
                                  ffi.NULL if out is None else out), "adopt")

    def set_group_limit(self, group: int, limit: int) -> None:
        """Let at most `limit` tasks of group index `group` run at once (0: no limit)."""
        if not isinstance(group, int) or not 0 < group < MAX_GROUPS:
            raise errors.InvalidArgument(f"group index must be in 1..{MAX_GROUPS - 1}, got {group!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit < 1 << 32:
            raise errors.InvalidArgument(f"a group limit must be an int >= 0, got {limit!r}")
        check(lib.hr_set_group_limit(self._mem, group, limit), "set_group_limit")

    @property
    def handle(self) -> Any:
        """The mapping as the C core takes it (a ``void *``)."""
        return self._mem

    def set_flush_seq(self, seq: int) -> None:
        """Writer only: its flush `seq` is committed and its slots are freed."""
        check(lib.hr_set_flush_seq(self._mem, seq), "set_flush_seq")

    def running(self, max: int = 100) -> List[SlotInfo]:
        """Snapshots of up to `max` running tasks (in no particular order)."""
        out = ffi.new("hr_dirty[]", max)
        n = check(lib.hr_running(self._mem, max, out), "running")
        return [_slot_info(out[k].slot, out[k].rec) for k in range(n)]

    def group_info(self, group: int) -> Dict[str, int]:
        """A group's limit, running and parked counts, and the slots its tasks hold."""
        g = ffi.new("hr_group *")
        check(lib.hr_group_info(self._mem, group, g), "group_info")
        return {"limit": int(g.limit), "running": int(g.running), "parked": int(g.parked), "members": int(g.members)}

    def progress(self, ticket: Ticket, fraction: float) -> bool:
        """Record a running attempt's progress (0..1); False if it was fenced."""
        t = ffi.new("hr_ticket *")
        t.id, t.slot, t.attempt = ticket
        rc = lib.hr_progress(self._mem, t, int(round(fraction * 1_000_000)))
        if rc == lib.HR_E_STALE:
            return False
        check(rc, "progress")
        return True

    def clock(self, ticket: Ticket, start: bool, lease_until: int, now: Optional[int] = None) -> bool:
        """Start a running attempt's deadline (now plus its timeout), or stop
        it once the attempt ended and its outcome is on its way to the
        writer; renews the lease to `lease_until` (never past the deadline).
        False if the attempt was fenced."""
        t = ffi.new("hr_ticket *")
        t.id, t.slot, t.attempt = ticket
        rc = lib.hr_clock(self._mem, t, now_us() if now is None else now, lease_until, 1 if start else 0)
        if rc == lib.HR_E_STALE:
            return False
        check(rc, "clock")
        return True

    def heartbeat(self, ticket: Ticket, lease_until: int) -> bool:
        """Extend a running attempt's lease; False if the attempt was fenced."""
        t = ffi.new("hr_ticket *")  # not self._ticket: a lease thread heartbeats while pop may run
        t.id, t.slot, t.attempt = ticket
        rc = lib.hr_heartbeat(self._mem, t, lease_until)
        if rc == lib.HR_E_STALE:
            return False
        check(rc, "heartbeat")
        return True

    def remove(self, id: int) -> int:
        """Cancel live task `id` wherever it is; returns its slot."""
        return check(lib.hr_cancel(self._mem, id), f"remove of task {id}")

    cancel = remove

    def get(self, id: int) -> Optional[SlotInfo]:
        """A snapshot of live task `id`, or None."""
        rc = lib.hr_get(self._mem, id, self._slot)
        if rc == lib.HR_E_NOT_FOUND:
            return None
        return _slot_info(check(rc, f"get of task {id}"), self._slot)

    def read_slot(self, slot: int) -> SlotInfo:
        """A snapshot of slot `slot`, whatever its state."""
        check(lib.hr_read_slot(self._mem, slot, self._slot), f"read of slot {slot}")
        return _slot_info(slot, self._slot)

    # ---- upkeep ------------------------------------------------------------

    def expire(self, now: int, max: int = 1024, out: Any = None, states: Any = None) -> Tuple[Any, int]:
        """Settle running tasks whose lease ran out by `now`: back to pending,
        or, past a deadline, a failed attempt (backoff, or dead once attempts
        are used up).  `states[k]` gets each one's new state, with
        :data:`TIMED_OUT` set when its deadline had passed."""
        out = self.tickets(max) if out is None else out
        return out, check(lib.hr_expire(self._mem, now, max, out, ffi.NULL if states is None else states), "expire")

    def promote(self, now: int, max: int = 1 << 30) -> int:
        """Make delayed tasks whose run-at passed pending; returns how many."""
        return check(lib.hr_promote(self._mem, now, max), "promote")

    def peek_best(self) -> Optional[SlotInfo]:
        """The pending task a claim would take next, or None."""
        return self._peek(lib.hr_peek_best)

    def peek_worst(self) -> Optional[SlotInfo]:
        """The pending task that ranks last, or None."""
        return self._peek(lib.hr_peek_worst)

    def _peek(self, fn: Any) -> Optional[SlotInfo]:
        rc = fn(self._mem, self._slot)
        if rc == lib.HR_E_NOT_FOUND:
            return None
        return _slot_info(check(rc, "peek"), self._slot)

    def evict_worst(self) -> Optional[SlotInfo]:
        """Remove and return the worst pending task (to spill it), or None."""
        return self._peek(lib.hr_evict_worst)

    def evict_parked(self, group: int) -> Optional[SlotInfo]:
        """Remove and return the worst parked task of `group` (to spill it), or None."""
        return self._peek(lambda mem, out: lib.hr_evict_parked(mem, group, out))

    # ---- dedup -------------------------------------------------------------

    def dedup_lookup(self, key: Tuple[int, int]) -> Optional[int]:
        """The slot of the live task holding `key`, or None."""
        rc = lib.hr_dedup_lookup(self._mem, key[0], key[1])
        return None if rc == lib.HR_E_NOT_FOUND else check(rc, "dedup_lookup")

    def dedup_insert(self, key: Tuple[int, int], slot: int) -> None:
        """Register `key` for live slot `slot`."""
        check(lib.hr_dedup_insert(self._mem, key[0], key[1], slot), f"dedup_insert for slot {slot}")

    def dedup_delete(self, key: Tuple[int, int]) -> bool:
        """Forget `key`; False if it was not registered."""
        rc = lib.hr_dedup_delete(self._mem, key[0], key[1])
        return rc != lib.HR_E_NOT_FOUND and check(rc, "dedup_delete") == 0

    # ---- the dirty ring ------------------------------------------------------

    def mark_dirty(self, slot: int) -> None:
        """Queue slot `slot` for the next flush."""
        check(lib.hr_mark_dirty(self._mem, slot), f"mark_dirty of slot {slot}")

    def peek_dirty(self, max: int, out: Any = None) -> Tuple[Any, int, int]:
        """Snapshot up to `max` dirty slots without consuming them: (records, n, epoch)."""
        out = self.dirty_records(max) if out is None else out
        epoch = ffi.new("uint32_t *")
        n = check(lib.hr_dirty_peek(self._mem, max, out, epoch), "peek_dirty")
        return out, n, int(epoch[0])

    def advance_dirty(self, n: int, epoch: int, flush_seq: int = 0) -> int:
        """Consume the first `n` peeked entries after they were committed,
        and (writer only) publish `flush_seq` as the last flush whose slots
        are freed, in the same lock hold as the frees (0 leaves it).

        Returns how many terminal slots were freed.  Raises
        :class:`errors.Stale` if the ring was rebuilt since the peek; peek again.
        """
        return check(lib.hr_dirty_advance(self._mem, n, epoch, flush_seq), "advance_dirty")

    # ---- task ids --------------------------------------------------------------

    def reserve_ids(self, n: int) -> int:
        """Hand out `n` consecutive task ids; returns the first."""
        first = ffi.new("uint64_t *")
        check(lib.hr_reserve_ids(self._mem, n, first), "reserve_ids")
        return int(first[0])

    def raise_next_id(self, v: int) -> None:
        """Make the next id handed out at least `v` (never lowers it)."""
        check(lib.hr_raise_next_id(self._mem, v), "raise_next_id")

    # ---- the request area --------------------------------------------------------
    #
    # Positions are monotonic byte counts.  A producer: pos = req_reserve(n)
    # (None while the area is full: wait on EV_COMMIT and retry), req_write,
    # req_publish; wait on EV_COMMIT until req_get(pos).state is REQ_ANSWERED,
    # req_read the answer, then req_set_state(pos, REQ_DONE).  The writer walks
    # records with req_next from the head, answers them with req_answer, and
    # frees what is finished with req_reclaim.  Outputs are allocated per
    # call (about 0.1 us), so producer threads may share one Segment.

    def req_reserve(self, nbytes: int) -> Optional[int]:
        """Reserve a record for `nbytes` of request data; its position, or None if full.

        Full also nudges the writer (EV_WRITER) so that it reclaims finished records.
        """
        pos = ffi.new("uint64_t *")
        try:
            rc = lib.hr_req_reserve(self._mem, nbytes, os.getpid(), pos)
        except (OverflowError, TypeError):
            msg = f"req_reserve: nbytes must be an unsigned 32-bit int, got {nbytes!r}"
            raise errors.InvalidArgument(msg) from None
        if rc == _E_FULL:
            lib.hr_notify(self._mem, EV_WRITER)
            return None
        if rc < 0:
            check(rc, f"req_reserve of {nbytes} bytes", f"at most {self._req_cap() // 2 - REQ_HEADER} fit")
        return int(pos[0])

    def req_send(self, data: bytes, room: int = 0) -> Optional[int]:
        """Reserve a record of `room` bytes (at least the data's), write
        `data`, publish it and wake the writer, in one call: its position,
        or None while the area is full (the writer is nudged)."""
        pos = ffi.new("uint64_t *")
        rc = lib.hr_req_send(self._mem, data, len(data), room, os.getpid(), pos)
        if rc == _E_FULL:
            return None
        if rc < 0:
            check(rc, f"req_send of {len(data)} bytes", f"at most {self._req_cap() // 2 - REQ_HEADER} fit")
        return int(pos[0])

    def req_await(self, pos: int, timeout: float) -> Optional[bytes]:
        """The answer to our record at `pos` once the writer wrote it (the
        record is then DONE), or None if `timeout` seconds passed first.
        InvalidState if the record was abandoned."""
        n = ffi.new("uint32_t *")
        rc = lib.hr_req_await(self._mem, pos, int(timeout * 1e6), n)
        if rc in _E_AGAIN:
            return None
        if rc < 0:
            raise errors.InvalidState(f"request {pos} was abandoned or is gone (status {rc})")
        data = self.req_read(pos, n[0])
        self.req_set_state(pos, REQ_DONE)
        return data

    def send_plain(self, mode: int, name: bytes, body: bytes, prio: int, ser: int, run_at: int, created: int,
                   max_attempts: int, timeout_ms: int, backoff: int) -> Optional[Tuple[int, int]]:
        """Send a plain request of one job (csrc/plain.h) in one call: its
        id is handed out here.  (position, id), or None while the area is full."""
        sent = ffi.new("uint64_t[2]")  # per call: producer threads share the segment
        rc = lib.hr_plain_send(self._mem, mode, name, len(name), body, len(body), prio, ser, run_at, created,
                               max_attempts, timeout_ms, backoff, os.getpid(), sent)
        if rc < 0:
            self._unless_full(rc, body)
            return None
        return int(sent[0]), int(sent[1])

    def _unless_full(self, rc: int, body: bytes) -> None:
        """Raise hr_plain_send's failure `rc`, unless the area is full (the
        caller tries again once it has room)."""
        if rc != _E_FULL:
            check(rc, f"send_plain of {len(body)} bytes", f"at most {self._req_cap() // 2 - REQ_HEADER} fit")

    def await_plain(self, pos: int, timeout: float) -> Union[None, bytes, Tuple[int, int, int]]:
        """The answer to a one-job request, as :meth:`req_await` gives it:
        (kind, id, other id) for the usual answer, the answer's bytes for any
        other (an error), or None if `timeout` seconds passed first."""
        a = ffi.new("int64_t[3]")  # per call: producer threads share the segment
        return self._plain_answer(lib.hr_plain_await(self._mem, pos, int(timeout * 1e6), a), pos, a)

    def submit_plain(self, mode: int, name: bytes, body: bytes, prio: int, ser: int, run_at: int, created: int,
                     max_attempts: int, timeout_ms: int, backoff: int, timeout: float
                     ) -> Optional[Tuple[int, int, Union[None, bytes, Tuple[int, int, int]]]]:
        """:meth:`send_plain`, then :meth:`await_plain` for up to `timeout`
        seconds, in one call: (position, id, answer), or None while the area
        is full (nothing was sent).  The answer is None if it did not come
        (the time passed, or the record was dropped): :meth:`await_plain`
        then waits, or says why."""
        out = ffi.new("int64_t[6]")  # per call: producer threads share the segment
        try:
            rc = lib.hr_plain_submit(self._mem, mode, name, len(name), body, len(body), prio, ser, run_at, created,
                                     max_attempts, timeout_ms, backoff, os.getpid(), int(timeout * 1e6), out)
        except BaseException:  # interrupted as it returned: an answer nobody reads would hold up the area
            if out[0]:
                self.give_up(int(out[1]))
            raise
        if not out[0]:
            self._unless_full(rc, body)
            return None
        pos = int(out[1])
        return pos, int(out[2]), self._plain_answer(rc, pos, out + 3) if rc in (0, lib.HR_E_BUSY) else None

    def _plain_answer(self, rc: int, pos: int, a: Any) -> Union[None, bytes, Tuple[int, int, int]]:
        """hr_plain_await's outcome `rc`, with the answer it left in `a`."""
        if rc == 0:
            return int(a[0]), int(a[1]), int(a[2])
        if rc == lib.HR_E_BUSY:
            data = self.req_read(pos, self.req_get(pos).nbytes)
            self.req_set_state(pos, REQ_DONE)
            return data
        if rc in _E_AGAIN:
            return None
        raise errors.InvalidState(f"request {pos} was abandoned or is gone (status {rc})")

    def give_up(self, pos: int) -> None:
        """Abandon our record at `pos` (READY: the writer skips it, or drops
        its answer), or mark an answer we will not read DONE."""
        try:
            if not self.req_cas_state(pos, REQ_READY, REQ_ABANDONED):
                self.req_cas_state(pos, REQ_ANSWERED, REQ_DONE)
        except errors.EngineError:
            pass  # no longer a record of ours to give up

    def _req_cap(self) -> int:
        return self.info()["req_cap"]

    def _req_data(self, pos: int, what: str) -> Tuple[int, int]:
        """(offset in the mapping, capacity) of the data of the record at `pos`."""
        off = ffi.new("uint64_t *")
        rc = lib.hr_req_data(self._mem, pos, off)
        if rc < 0:
            check(rc, f"{what} of request {pos}")
        return int(off[0]), rc

    def req_write(self, pos: int, data: bytes, at: int = 0) -> None:
        """Copy `data` into the data area of the record at `pos`, `at` bytes in."""
        off, room = self._req_data(pos, "req_write")
        n = len(data)
        if not 0 <= at <= room - n:
            raise errors.InvalidArgument(f"req_write: {n} bytes at {at} do not fit in request {pos} ({room} bytes)")
        self._mm[off + at:off + at + n] = data

    def req_read(self, pos: int, nbytes: int, at: int = 0) -> bytes:
        """`nbytes` of the record's data, from `at` bytes in."""
        off, room = self._req_data(pos, "req_read")
        if not (0 <= nbytes and 0 <= at and at + nbytes <= room):
            raise errors.InvalidArgument(f"req_read: request {pos} holds at most {room} bytes, not {nbytes} at {at}")
        return self._mm[off + at:off + at + nbytes]

    def req_stream(self, pos: int, nbytes: int) -> None:
        """Say that the first `nbytes` of a RESERVED record's data are
        written (a request sent in parts), and wake the writer."""
        check(lib.hr_req_stream(self._mem, pos, nbytes), f"req_stream of request {pos}")
        lib.hr_notify(self._mem, EV_WRITER)

    def req_publish(self, pos: int, nbytes: Optional[int] = None) -> None:
        """Mark the record READY (holding `nbytes` of data, if given; else
        what was reserved) and wake the writer."""
        if nbytes is not None:
            check(lib.hr_req_set_nbytes(self._mem, pos, nbytes), f"req_publish of request {pos}")
        check(lib.hr_req_set_state(self._mem, pos, REQ_READY), f"req_publish of request {pos}")
        lib.hr_notify(self._mem, EV_WRITER)

    def req_answer(self, pos: int, data: bytes) -> bool:
        """Write the answer in place of the request and mark the record ANSWERED.

        Only a READY record is answered: False if its producer abandoned it
        meanwhile (the record stays ABANDONED and is reclaimable).  No
        wake-up: the writer notifies EV_COMMIT once per batch.
        """
        rc = lib.hr_req_answer(self._mem, pos, data, len(data))
        if rc == _E_STATE:
            h = self.req_get(pos)
            if h is not None and h.state == REQ_ABANDONED:
                return False
            raise errors.InvalidState(f"req_answer: request {pos} is in state "
                                      f"{h.state if h else None}, not READY")
        check(rc, f"req_answer of {len(data)} bytes to request {pos}")
        return True

    def req_set_state(self, pos: int, state: int) -> None:
        """Store `state` (any REQ_* but REQ_PAD) into the record at `pos`."""
        check(lib.hr_req_set_state(self._mem, pos, state), f"req_set_state of request {pos}")

    def req_cas_state(self, pos: int, expect: int, state: int) -> bool:
        """Move the record from `expect` to `state` atomically; False if it was not in `expect`."""
        rc = lib.hr_req_cas_state(self._mem, pos, expect, state)
        if rc == _E_STATE:
            return False
        check(rc, f"req_cas_state of request {pos}")
        return True

    def req_get(self, pos: int) -> Optional[ReqHeader]:
        """The header of the record at `pos`; None at or after the tail."""
        return self._req_header(lib.hr_req_get, pos, f"req_get of request {pos}")

    def req_next(self, pos: int) -> Optional[ReqHeader]:
        """The first non-pad record at or after `pos`; None at the tail."""
        return self._req_header(lib.hr_req_next, pos, f"req_next from {pos}")

    def _req_header(self, fn: Any, pos: int, what: str) -> Optional[ReqHeader]:
        r = ffi.new("hr_req *")
        rc = fn(self._mem, pos, r)
        if rc == _E_NOT_FOUND:
            return None
        check(rc, what)
        return ReqHeader(r.pos, r.len, r.state, r.pid, r.nbytes, r.tag)

    def req_reclaim(self, upto: int) -> int:
        """Writer only: free finished records before `upto`; returns the new head."""
        return check(lib.hr_req_reclaim(self._mem, upto), "req_reclaim")

    def req_sweep(self, upto: int) -> int:
        """Writer only: mark abandoned each answered record before `upto`
        whose producer died before reading it, then free finished records
        before `upto`; returns the new head."""
        return check(lib.hr_req_sweep(self._mem, upto), "req_sweep")

    def req_bounds(self) -> Tuple[int, int]:
        """(head, tail): the oldest unreclaimed record and where the next one goes."""
        b = ffi.new("uint64_t[2]")
        lib.hr_req_bounds(self._mem, b, b + 1)
        return int(b[0]), int(b[1])

    # ---- wake-ups ------------------------------------------------------------

    def event(self, ev: int) -> int:
        """The current value of event word `ev`."""
        return int(lib.hr_event_value(self._mem, ev))

    def notify(self, ev: int) -> None:
        """Bump event `ev` and wake its waiters."""
        lib.hr_notify(self._mem, ev)

    def wait(self, ev: int, seen: int, timeout: Optional[float] = None) -> bool:
        """Block until event `ev` differs from `seen`; False on timeout.
        True also when a signal cut the wait short (its Python handler runs
        as this returns): the caller looks again, as after any wake-up."""
        us = -1 if timeout is None else max(0, int(timeout * 1e6))
        rc = lib.hr_wait(self._mem, ev, seen, us)
        if rc == lib.HR_E_TIMEOUT:
            return False
        if rc != lib.HR_E_INTERRUPTED:
            check(rc, "wait")
        return True

    # ---- inspection ------------------------------------------------------------

    def verify(self) -> None:
        """Check every invariant; raises SegmentCorrupt naming the first broken one."""
        rc = lib.hr_verify(self._mem, self._msg, len(self._msg))
        check(rc, f"segment {self.path}", ffi.string(self._msg).decode() or None)

    def pending_count(self) -> int:
        """Pending tasks, read without the lock (it may be a step behind)."""
        return lib.hr_pending_count(self._mem)

    def raw_info(self) -> Any:
        """The ``hr_info`` counters as a cffi struct (reused by the next call): the cheap form of :meth:`info`."""
        i = self._info
        check(lib.hr_get_info(self._mem, i), "info")
        return i

    def info(self) -> Dict[str, Any]:
        """Counters and sizes, read under the lock."""
        i = ffi.new("hr_info *")
        check(lib.hr_get_info(self._mem, i), "info")
        s = i.stats
        return {
            "generation": int(i.generation),
            "capacity": int(i.capacity),
            "free": int(i.nfree),
            "counts": {STATE_NAMES[k]: int(i.count[k]) for k in range(len(STATE_NAMES))},
            "ring": int(i.ring_size),
            "ring_epoch": int(i.ring_epoch),
            "next_seq": int(i.next_seq),
            "next_id": int(i.next_id),
            "req_head": int(i.req_head),
            "req_tail": int(i.req_tail),
            "req_cap": int(i.req_cap),
            "stats": {f: int(getattr(s, f)) for f in (
                "repairs", "fenced", "claimed", "finished", "inserted", "expired", "evicted",
                "lock_spins_won", "lock_sleeps", "flush_seq")},
        }


# hr_task as bytes: id, seq, run_at, dedup_lo, dedup_hi, aux, group, attempt, max_attempts,
# timeout_ms, bo_base_ms, bo_cap_ms, prio, state, flags, bo_kind.
_TASK = struct.Struct("<QQqQQQIIIIIIBBBB4x")
assert _TASK.size == ffi.sizeof("hr_task")


def pack_backoff(kind: int, base_ms: int, cap_ms: int) -> int:
    """One int for a retry backoff: kind (with :data:`BO_JITTER`), base and cap in ms.

    A signed 64-bit value (a cap of 2**27 ms or more sets the top bit), so
    that SQLite and C store it as it is; :func:`unpack_backoff` masks."""
    v = kind | base_ms << 8 | cap_ms << 36
    return v - (1 << 64) if v >= 1 << 63 else v


def unpack_backoff(packed: int) -> Tuple[int, int, int]:
    return packed & 0xFF, (packed >> 8) & BO_MS_MAX, (packed >> 36) & BO_MS_MAX


def backoff_us(packed: int, attempt: int, rnd: int = 0) -> int:
    """The retry delay after failed attempt `attempt` (1-based), in us."""
    kind, base, cap = unpack_backoff(packed)
    return int(lib.hr_backoff_us(kind, base, cap, attempt, rnd))


def pack_tasks(rows: Any) -> Tuple[Any, int]:
    """An ``hr_task[]`` from rows of (id, prio, seq, state, run_at, dedup,
    attempt, max_attempts, timeout_ms, backoff, group), where dedup is the
    16-byte key or None, backoff is :func:`pack_backoff`'s int and group a
    group index (0: none); for the writer's bulk inserts.  The C side
    validates every record again."""
    pack = _TASK.pack
    key = split_key
    parts = []
    for tid, prio, seq, state, run_at, dedup, attempt, max_attempts, timeout_ms, bo, group in rows:
        if bo:
            kind, base, cap = bo & 0xFF, (bo >> 8) & BO_MS_MAX, (bo >> 36) & BO_MS_MAX
        else:
            kind = base = cap = 0
        if dedup is None:
            parts.append(pack(tid, seq, run_at, 0, 0, 0, group, attempt, max_attempts, timeout_ms, base, cap,
                              prio, state, 0, kind))
        else:
            lo, hi = key(dedup)
            parts.append(pack(tid, seq, run_at, lo, hi, 0, group, attempt, max_attempts, timeout_ms, base, cap,
                              prio, state, F_DEDUP, kind))
    n = len(parts)
    arr = ffi.new("hr_task[]", n)
    if n:
        ffi.memmove(arr, b"".join(parts), n * _TASK.size)
    return arr, n


def join_tasks(parts: Sequence[Tuple[Any, int]]) -> Any:
    """One ``hr_task[]`` of several (array, count) parts, in order."""
    out = ffi.new("hr_task[]", sum(n for _, n in parts))
    at = 0
    for arr, n in parts:
        ffi.memmove(out + at, arr, n * _TASK.size)
        at += n
    return out


def fill_task(t: Any, id: int, *, prio: int = 0, seq: int = 0, state: int = PENDING, run_at: int = 0,
              dedup: Optional[Tuple[int, int]] = None, group: int = 0, attempt: int = 0,
              aux: int = 0, max_attempts: int = 0, timeout_ms: int = 0, backoff: int = 0) -> None:
    """Fill one ``hr_task`` record, checking ranges with clear errors."""
    if not isinstance(prio, int) or isinstance(prio, bool) or not 0 <= prio <= 255:
        raise errors.InvalidArgument(f"priority must be an int in 0..255, got {prio!r}")
    if not isinstance(id, int) or isinstance(id, bool) or not 0 < id < 1 << 64:
        raise errors.InvalidArgument(f"task id must be a positive 64-bit int, got {id!r}")
    if state not in (PENDING, DELAYED, WAITING):
        raise errors.InvalidArgument(f"a new task must be pending, delayed or waiting, got state {state!r}")
    t.id = id
    t.prio = prio
    t.seq = seq
    t.state = state
    t.run_at = run_at
    t.group = group
    t.attempt = attempt
    t.aux = aux
    t.max_attempts = max_attempts
    t.timeout_ms = timeout_ms
    t.bo_kind, t.bo_base_ms, t.bo_cap_ms = unpack_backoff(backoff)
    if dedup is None:
        t.flags = 0
        t.dedup_lo = t.dedup_hi = 0
    else:
        t.flags = F_DEDUP
        t.dedup_lo, t.dedup_hi = dedup


def set_lock_spin(spins: int) -> None:
    """Trylock rounds before blocking on the segment mutex (this process)."""
    lib.hr_set_lock_spin(spins)


def set_wait_spin(us: int) -> None:
    """Microseconds a waiter spins before sleeping (this process)."""
    lib.hr_set_wait_spin(us)


def spin_slots(ev: int) -> int:
    """How many waiters on event `ev` may spin at once, as this process sees the machine now."""
    return int(lib.hr_spin_slots(ev))


def usable_cpus() -> int:
    """CPUs this process may use (its affinity mask and cgroup CPU quota,
    v2 or v1, counted), as the spin rule counts them."""
    return int(lib.hr_usable_cpus())


def quota_cpus(cpu_max: str) -> Optional[int]:
    """Whole CPUs that cgroup v2 ``cpu.max`` text allows: 0 for no limit,
    None where the text does not say."""
    n = int(lib.hr_quota_cpus(cpu_max.encode()))
    return None if n < 0 else n


def quota_cpus_v1(quota_us: str, period_us: str) -> Optional[int]:
    """Whole CPUs that cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``
    texts allow: 0 for no limit, None where the texts do not say."""
    n = int(lib.hr_quota_cpus_v1(quota_us.encode(), period_us.encode()))
    return None if n < 0 else n


def runnable_fit(loadavg: str, cores: int) -> Optional[bool]:
    """Whether /proc/loadavg text `loadavg` counts at most `cores` runnable
    tasks; None where the text does not say."""
    rc = lib.hr_runnable_fit(loadavg.encode(), cores)
    return None if rc < 0 else bool(rc)


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def unused(path: str, unlink: bool = False) -> bool:
    """Whether no process has segment file `path` mapped (none holds its
    shared flock); with `unlink`, remove it if so, before anyone can attach."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        # An attach that opened the file waits for our lock, then sees it gone and looks again.
        return _unlink_quiet(path) if unlink else True
    finally:
        os.close(fd)


def read_note(path: str) -> Optional[bytes]:
    """The note that :meth:`Segment.create` left in segment file `path`;
    None if it has none (made before notes, or not a segment) or is not
    a regular file of this user."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size < NOTE_SIZE:
            return None
        data = os.pread(fd, NOTE_SIZE, st.st_size - NOTE_SIZE)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) < _NOTE.size:
        return None
    magic, n = _NOTE.unpack_from(data)
    if magic != _NOTE_MAGIC or n > len(data) - _NOTE.size:
        return None
    return data[_NOTE.size:_NOTE.size + n]


def _unlink_quiet(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
