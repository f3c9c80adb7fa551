"""The bytes a producer hands the writer through the segment's request area,
and the answer the writer writes back in place.

A request is one chunk of a submit: ``marshal`` of ``(on_duplicate, items)``,
or, when every job is plain, the packed form that the writer's C turn reads
(:func:`encode_request`).  marshal is fast and only ever reads records that
a process of the same user wrote in full (the area is mode 0600 and a record
is read only once its producer published it).  An answer packs, per item, a
kind byte and two 64-bit ids, so it never needs more room than
:func:`answer_room` reserves.
"""
from __future__ import annotations

import marshal
import struct
from array import array
from typing import Any, List, Optional, Sequence, Tuple

from . import errors
from ._core import ffi, lib

ON_DUPLICATE = {"skip": 0, "supersede": 1, "reject": 2}
#: Set in the mode when the producer sends a request again after the
#: segment was rebuilt: the writer then checks which ids are already stored.
REPLAY = 0x100

# Outcome kinds, as the answer encodes them.
INSERTED, DUPLICATE, SUPERSEDED, REJECTED = 0, 1, 2, 3
KIND_NAMES = ("inserted", "duplicate", "superseded", "rejected")

#: One job as it travels: (id, name, body, ser, prio, dedup, run_at, max_attempts, group, created,
#: timeout_ms, backoff, depends_on, tags); backoff is shm.pack_backoff's int, depends_on a list of
#: task ids or None, tags a list of (key, value) or None.
Item = Tuple[int, str, bytes, int, int, Optional[bytes], int, int, Optional[str], int, int, int,
             Optional[List[int]], Optional[List[Tuple[str, str]]]]
ITEM_FIELDS = 14
#: In an item's timeout_ms and backoff: the submitter does not know the
#: task's definition; the writer takes the registered one (max_attempts 0
#: says the same for the attempt limit).
UNSET = -1

#: A worker's report of an attempt that carries data the database must hold
#: before the slot may show the outcome: a return value or an error.  The
#: writer stores it, then settles the slot; nobody waits for an answer.
REPORT = 0x200
#: A report item: (id, slot, attempt, kind, retry, delay_us, body)
Report = Tuple[int, int, int, int, int, int, bytes]
RESULT, ERROR = 0, 1
#: Submit events as the events table stores them.
EV_SUBMITTED, EV_BATCH_SUBMITTED = 1, 2

#: Management commands that need the writer: ``(MANAGE, (command, args))``.
MANAGE = 0x400

_HEAD = struct.Struct("<I")
_ERROR = 0xFFFFFFFF


#: A request of plain jobs (no dedup key, group, dependency or tag) is
#: packed for the writer's C turn (csrc/turn.h): a head, then per job a
#: fixed part followed by its name and body.
PLAIN_MAGIC = 0x31425248
_PLAIN_HEAD = struct.Struct("<IIII")  # magic, mode, count, 0
# id, run_at, created, backoff, timeout_ms, max_attempts, name length, prio, ser, body length
_PLAIN_ITEM = struct.Struct("<QqqqqiHBBI")
PLAIN_MAGIC_BYTES = struct.pack("<I", PLAIN_MAGIC)


def plain(it: Item) -> bool:
    """Whether an item is a plain job (no dedup key, group, dependency or tag)."""
    return len(it) == ITEM_FIELDS and it[5] is None and it[8] is None and it[12] is None and it[13] is None


def encode_request(on_duplicate: int, items: Sequence[Item]) -> bytes:
    """A request for one chunk of a submit (plain jobs are packed for the C turn)."""
    if on_duplicate <= 2 and all(map(plain, items)):
        pack = _PLAIN_ITEM.pack
        parts = [_PLAIN_HEAD.pack(PLAIN_MAGIC, on_duplicate, len(items), 0)]
        try:
            for it in items:
                name = it[1].encode()
                parts += (pack(it[0], it[6], it[9], it[11], it[10], it[7], len(name), it[4], it[3], len(it[2])),
                          name, it[2])
            return b"".join(parts)
        except (UnicodeEncodeError, struct.error, TypeError, AttributeError):
            pass  # not packable (a name past the producer's checks, say): the writer refuses it from marshal
    return _marshal(on_duplicate, items)


def _marshal(mode: int, items: Sequence[Any]) -> bytes:
    return marshal.dumps((mode, list(items)))


def _decode_plain(data: bytes) -> Tuple[int, List[Any]]:
    try:
        _, mode, n, zero = _PLAIN_HEAD.unpack_from(data)
        unpack, size = _PLAIN_ITEM.unpack_from, _PLAIN_ITEM.size
        at, items = _PLAIN_HEAD.size, []
        for _ in range(n):
            tid, run_at, created, bo, timeout_ms, max_attempts, nlen, prio, ser, blen = unpack(data, at)
            at += size
            name = data[at:at + nlen].decode()
            body = bytes(data[at + nlen:at + nlen + blen])
            at += nlen + blen
            if len(body) != blen:
                raise ValueError("a truncated job")
            items.append((tid, name, body, ser, prio, None, run_at, max_attempts, None, created, timeout_ms,
                          bo if timeout_ms >= 0 else UNSET, None, None))
    except (struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"undecodable: {e}") from None
    if zero or at != len(data) or not n:
        raise ValueError("a plain request of the wrong size")
    return mode, items


def encode_reports(reports: Sequence[Report]) -> bytes:
    return _marshal(REPORT, reports)


def encode_manage(command: str, args: Sequence[Any]) -> bytes:
    return _marshal(MANAGE, [(command, tuple(args))])


def decode_request(data: bytes) -> Tuple[int, List[Any]]:
    """(mode, items); ValueError for bytes that are not a request."""
    if data[:4] == PLAIN_MAGIC_BYTES:
        return _decode_plain(data)
    try:
        mode, items = marshal.loads(data)
    except (EOFError, TypeError) as e:
        raise ValueError(f"undecodable: {e}") from None
    if not isinstance(mode, int) or not isinstance(items, list) or not set(map(type, items)) <= {tuple}:
        raise ValueError("not a list of items")
    # C-level checks (set/map), not a Python loop per item.
    want = 7 if mode == REPORT else 2 if mode == MANAGE else ITEM_FIELDS
    if not set(map(len, items)) <= {want}:
        raise ValueError("items of the wrong shape")
    return mode, items


#: A request sent in parts (a submit_batch chunk streamed while it is being
#: serialised) is a run of frames, each a length and a request as above; the
#: record's tag counts the bytes of whole frames written so far.
_FRAME = struct.Struct("<I")


FRAME_HEAD = _FRAME.size


def encode_frame(mode: int, items: Sequence[Item]) -> bytes:
    body = encode_request(mode, items)  # plain parts go to the writer's C turn
    return _FRAME.pack(len(body)) + body


def plain_frame(mode: int, name: bytes, first_id: int, created: int, limits: Tuple[int, int, int], ser: int,
                prios: bytes, json_array: bytes, max_body: int) -> Optional[bytes]:
    """One frame of plain jobs that differ only in priority and payload:
    ids from `first_id`, `limits` (max_attempts, timeout_ms, backoff) and
    `ser` shared, and as bodies the elements of `json_array` (see
    csrc/plain.h); None if that array does not hold one element per job of
    at most `max_body` bytes."""
    n = len(prios)
    out = ffi.new("char[]", _FRAME.size + _PLAIN_HEAD.size + n * (_PLAIN_ITEM.size + len(name)) + len(json_array))
    max_attempts, timeout_ms, backoff = limits
    size = lib.hr_plain_pack(out, len(out), mode, name, len(name), first_id, created, backoff, timeout_ms,
                             max_attempts, ser, prios, n, json_array, len(json_array), max_body)
    return ffi.buffer(out, size)[:] if size > 0 else None


def decode_frames(data: bytes) -> List[Tuple[int, List[Any]]]:
    """The (mode, items) of each whole frame; ValueError for bytes that are not frames."""
    out = []
    at, end = 0, len(data)
    view = memoryview(data)
    while at < end:
        if end - at < _FRAME.size:
            raise ValueError("a truncated frame header")
        (n,) = _FRAME.unpack_from(data, at)
        at += _FRAME.size
        if n > end - at:
            raise ValueError(f"a frame of {n} bytes with {end - at} left")
        out.append(decode_request(bytes(view[at:at + n])))
        at += n
    return out


def decode_streamed(data: bytes) -> Tuple[int, List[Any]]:
    """A whole request sent in parts, as (mode, items) like :func:`decode_request`."""
    frames = decode_frames(data)
    mode = frames[0][0] if frames else 0
    if any(f[0] != mode for f in frames):
        raise ValueError("parts of one request with different modes")
    return mode, [it for f in frames for it in f[1]]


def answer_room(n: int) -> int:
    """Bytes an answer for `n` items may take."""
    return _HEAD.size + 17 * n + 256


def encode_answer(kinds: Sequence[int], ids: Sequence[int], others: Sequence[int]) -> bytes:
    flat = array("q")
    for a, b in zip(ids, others):
        flat.append(a)
        flat.append(b)
    return _HEAD.pack(len(kinds)) + bytes(kinds) + flat.tobytes()


def encode_inserted(ids: Sequence[int]) -> bytes:
    """The answer when every item was inserted under its own id."""
    n = len(ids)
    flat = array("q", bytes(16 * n))
    flat[0::2] = array("q", ids)
    return _HEAD.pack(n) + bytes(n) + flat.tobytes()


def encode_error(message: str) -> bytes:
    raw = message.encode("utf-8", "replace")[:200]
    return _HEAD.pack(_ERROR) + raw


def decode_answer(data: bytes) -> Tuple[bytes, array]:
    """(kinds, flat ids) where item k's id is flat[2k] and its other id flat[2k+1]."""
    (n,) = _HEAD.unpack_from(data)
    if n == _ERROR:
        why = data[_HEAD.size:].decode("utf-8", "replace").rstrip("\0")
        cls = errors.StoreFull if why.startswith("FullError") else errors.SubmitFailed
        raise cls("the writer could not commit this submit, nothing of it was stored: " + why)
    kinds = data[_HEAD.size:_HEAD.size + n]
    flat = array("q")
    flat.frombytes(data[_HEAD.size + n:_HEAD.size + n + 16 * n])
    return kinds, flat
