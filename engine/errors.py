"""Exceptions raised by headrace, and the one place C status codes become them.

Every exception derives from :class:`EngineError`; where the meaning fits, it
also derives from the matching builtin, so callers may catch either.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple, Type

from ._core import lib


class EngineError(Exception):
    """Base class of every headrace error."""


class InvalidArgument(EngineError, ValueError):
    """An argument is out of range or of the wrong kind."""


class InvalidType(InvalidArgument, TypeError):
    """An argument is of the wrong type."""


class NotSerializable(InvalidType):
    """Task arguments or a return value cannot be serialised by the queue's
    serializer (an unsupported type, a cycle, nesting too deep)."""


class PayloadTooLarge(InvalidArgument):
    """A serialised payload is larger than the configured limit."""


class CapacityFull(EngineError):
    """The shared-memory slot table has no free slot."""


class DuplicateTask(EngineError):
    """A live task already holds this dedup key (or id)."""


class TaskNotFound(EngineError, LookupError):
    """No live task with this id or key."""


class InvalidState(EngineError):
    """The task is not in a state that allows the operation."""


class Stale(EngineError):
    """Fenced: the attempt moved on, or the dirty ring was rebuilt since the peek."""


class SlotBusy(EngineError):
    """The slot has a change that must reach disk first."""


class WaitTimeout(EngineError, TimeoutError):
    """A wait ran out of time."""


class LockError(EngineError):
    """The segment mutex cannot be recovered."""


class SegmentError(EngineError):
    """The shared-memory segment cannot be used."""


class SegmentNotFound(SegmentError, FileNotFoundError):
    """No segment exists under this name."""


class SegmentExists(SegmentError, FileExistsError):
    """A segment already exists under this name."""


class SegmentForeign(SegmentError):
    """The file is not a headrace segment."""


class SegmentVersionMismatch(SegmentError):
    """The segment was made by another layout version or build."""


class SegmentTruncated(SegmentError):
    """The segment is smaller than its layout requires."""


class SegmentCorrupt(SegmentError):
    """The segment header or its invariants do not hold."""


class SegmentNotReady(SegmentError):
    """The segment's creator has not finished initialising it."""


class SegmentPermission(SegmentError, PermissionError):
    """The segment belongs to another user or is open to others."""


class StoreError(EngineError):
    """The database cannot be opened, read or written."""


class StoreCorrupt(StoreError):
    """The database file is not a headrace database or is damaged."""


class SchemaMismatch(StoreError):
    """The database was written by a newer headrace."""


class UnsafeFile(StoreError, PermissionError):
    """The database or one of its side files belongs to another user, is
    open to others, or is not a regular file."""


class WriterUnavailable(EngineError):
    """The writer process cannot be started or did not answer in time."""


class SubmitFailed(EngineError):
    """The writer could not commit a submit; nothing of that chunk was stored."""


class StoreFull(SubmitFailed, OSError):
    """The disk holding the database is full: the submit was not stored
    (the queue carries on, and stores again once there is room)."""


class TaskFailed(EngineError):
    """The task ended dead or cancelled instead of completed.

    ``.task_id``, ``.state`` ("dead" or "cancelled") and ``.error`` (the last
    attempt's error: a dict of type, message and traceback, or None)."""

    def __init__(self, message: str, task_id: int = 0, state: str = "", error: Optional[Dict[str, Any]] = None
                 ) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.state = state
        self.error = error


class Retry(EngineError):
    """Raise inside a task to ask for another attempt, after `delay` seconds
    (None: the task's backoff).  It still counts as an attempt."""

    def __init__(self, delay: Optional[float] = None, reason: str = "") -> None:
        if delay is not None and not (isinstance(delay, (int, float)) and not isinstance(delay, bool)
                                      and 0 <= delay <= 10**8):
            raise InvalidArgument(f"Retry delay must be None or seconds in 0..1e8, got {delay!r}")
        super().__init__(reason or (f"retry requested in {delay} s" if delay is not None else "retry requested"))
        self.delay = delay


class WaitInterrupted(EngineError, InterruptedError):
    """A wait in the core was cut short by a signal (the engine looks again)."""


class UnknownTask(EngineError, LookupError):
    """No task function is registered under this name."""


class UntrustedPayload(EngineError):
    """A pickled payload or result reached a queue that was not opened with
    serializer='pickle' (unpickling runs code: trusted producers only)."""


_REBUILD = "delete it (headrace rebuilds the segment from the database) and retry"

#: C status code -> (exception class, message).  The one mapping.
_STATUS: Dict[int, Tuple[Type[EngineError], str]] = {
    lib.HR_E_FULL: (CapacityFull, "the slot table is full"),
    lib.HR_E_DUPLICATE: (DuplicateTask, "a live task already holds this key"),
    lib.HR_E_NOT_FOUND: (TaskNotFound, "no such live task"),
    lib.HR_E_STALE: (Stale, "stale: the attempt or the ring moved on"),
    lib.HR_E_BAD_MAGIC: (SegmentForeign, f"not a headrace segment; {_REBUILD}"),
    lib.HR_E_BAD_VERSION: (SegmentVersionMismatch, f"made by another headrace layout or build; {_REBUILD}"),
    lib.HR_E_TRUNCATED: (SegmentTruncated, f"smaller than its layout requires; {_REBUILD}"),
    lib.HR_E_CORRUPT: (SegmentCorrupt, f"corrupt; {_REBUILD}"),
    lib.HR_E_FOREIGN_OWNER: (SegmentPermission, "created by another user; refusing to use it"),
    lib.HR_E_NOT_READY: (SegmentNotReady, "its creator has not finished initialising it"),
    lib.HR_E_INVALID: (InvalidArgument, "invalid argument"),
    lib.HR_E_LOCK: (LockError, f"its mutex cannot be recovered; {_REBUILD}"),
    lib.HR_E_TIMEOUT: (WaitTimeout, "timed out"),
    lib.HR_E_STATE: (InvalidState, "the task is not in a state that allows this"),
    lib.HR_E_BUSY: (SlotBusy, "the slot has an unflushed change"),
    lib.HR_E_INTERRUPTED: (WaitInterrupted, "a wait was cut short by a signal"),
}


def describe_error(type_name: str, message: str, tb: Optional[str] = None) -> bytes:
    """An attempt's error as stored: JSON of its type, message and traceback summary."""
    return json.dumps({"type": type_name, "message": message, "traceback": tb}).encode()


def read_error(body: Optional[bytes]) -> Optional[Dict[str, Any]]:
    """The stored error back as a dict (type, message, traceback), or None."""
    if body is None:
        return None
    try:
        out = json.loads(body)
    except ValueError:
        return {"type": "unknown", "message": repr(body[:200]), "traceback": None}
    return out if isinstance(out, dict) else None


def error_for(rc: int, context: str = "", detail: Optional[str] = None) -> EngineError:
    """The exception for C status `rc`, its message naming `context`."""
    cls, msg = _STATUS.get(rc, (EngineError, f"unknown status {rc}"))
    text = f"{context}: {msg}" if context else msg
    if detail:
        text = f"{text} ({detail})"
    return cls(text)


def check(rc: int, context: str = "", detail: Optional[str] = None) -> int:
    """Return `rc` if it is not an error status, else raise its exception."""
    if rc < 0:
        raise error_for(rc, context, detail)
    return rc
