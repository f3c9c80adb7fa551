"""Foreign, corrupt, truncated, other-version and other-owner segments."""
from __future__ import annotations

import gc
import os
import struct

import pytest

from engine import errors
from engine.shm import Segment, segment_path


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_create_attach_roundtrip(segname):
    a = Segment.create(segname, 100)
    b = Segment.attach(segname)
    assert a.generation == b.generation and b.capacity == 100
    a.push(7, prio=3)
    assert b.get(7).prio == 3
    a.close(), b.close()


def test_generation_changes_on_every_create(segname):
    gens = set()
    for _ in range(3):
        s = Segment.create(segname, 8)
        gens.add(s.generation)
        s.close()
        Segment.unlink(segname)
    assert len(gens) == 3


def test_missing_segment(segname):
    with pytest.raises(errors.SegmentNotFound) as e:
        Segment.attach(segname)
    assert isinstance(e.value, FileNotFoundError)


def test_create_twice_is_refused(segname):
    Segment.create(segname, 8).close()
    with pytest.raises(errors.SegmentExists):
        Segment.create(segname, 8)


def test_open_creates_then_attaches(segname):
    a = Segment.open(segname, 16)
    b = Segment.open(segname, 999)  # existing segment wins, capacity ignored
    assert b.capacity == 16 and a.generation == b.generation
    a.close(), b.close()


def test_foreign_file_is_refused(segname):
    path = segment_path(segname)
    with open(path, "wb") as f:
        f.write(b"this is not a segment at all" * 1000)
    os.chmod(path, 0o600)
    with pytest.raises(errors.SegmentForeign, match="not a headrace segment"):
        Segment.attach(segname)


def test_other_version_is_refused(segname):
    Segment.create(segname, 8).close()
    _patch(segment_path(segname), 8, struct.pack("<I", 999))
    with pytest.raises(errors.SegmentVersionMismatch, match="another headrace layout"):
        Segment.attach(segname)


@pytest.mark.parametrize("offset", [16, 24, 32, 40, 48, 64, 88, 96, 104, 112, 120, 128])
def test_corrupt_header_fields_are_refused(segname, offset):
    """Sizes, generation, capacity, offsets and the request area are all covered by the checksum."""
    Segment.create(segname, 8).close()
    path = segment_path(segname)
    with open(path, "rb") as f:
        f.seek(offset)
        old = f.read(1)
    _patch(path, offset, bytes([old[0] ^ 0x5A]))
    with pytest.raises(errors.SegmentCorrupt, match="corrupt"):
        Segment.attach(segname)


def test_truncated_segment_is_refused(segname):
    Segment.create(segname, 1000).close()
    path = segment_path(segname)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(errors.SegmentTruncated):
        Segment.attach(segname)
    os.truncate(path, 10)
    with pytest.raises(errors.SegmentTruncated):
        Segment.attach(segname)


def test_zeroed_segment_times_out_as_not_ready(segname):
    path = segment_path(segname)
    with open(path, "wb") as f:
        f.write(bytes(8192))
    os.chmod(path, 0o600)
    with pytest.raises(errors.SegmentNotReady):
        Segment.attach(segname, wait=0.05)


def test_segment_is_created_0600_whatever_the_umask(segname):
    old = os.umask(0)
    try:
        Segment.create(segname, 8).close()
    finally:
        os.umask(old)
    assert os.stat(segment_path(segname)).st_mode & 0o777 == 0o600


def test_loose_mode_is_refused(segname):
    Segment.create(segname, 8).close()
    os.chmod(segment_path(segname), 0o644)
    with pytest.raises(errors.SegmentPermission, match="0644"):
        Segment.attach(segname)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a file to another uid")
def test_other_owner_is_refused(segname):
    Segment.create(segname, 8).close()
    os.chown(segment_path(segname), 12345, -1)
    with pytest.raises(errors.SegmentPermission, match="uid 12345"):
        Segment.attach(segname)


def test_creator_uid_in_header_is_checked(segname):
    """A segment whose header names another creator is refused even if the file is ours."""
    from engine._core import lib

    s = Segment.create(segname, 8)
    assert lib.hr_attach(s._mem, s.size, os.geteuid() + 1) == lib.HR_E_FOREIGN_OWNER
    with pytest.raises(errors.SegmentPermission, match="another user"):
        errors.check(lib.hr_attach(s._mem, s.size, os.geteuid() + 1), "attach")
    s.close()


def test_symlink_is_refused(segname, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 100)
    os.symlink(target, segment_path(segname))
    with pytest.raises(errors.SegmentForeign):
        Segment.attach(segname)


def test_bad_names_and_capacities(segname):
    with pytest.raises(errors.InvalidArgument, match="bad segment name"):
        Segment.create("../etc/passwd", 8)
    for cap in (0, -1, 2**40, 1.5, True):
        with pytest.raises(errors.InvalidArgument, match="capacity"):
            Segment.create(segname, cap)


CHECKSUM = 144  # after off_req (112), req_cap (120), off_jc (128) and jc_cap (136)


def _fnv1a(data: bytes) -> int:
    x = 0xCBF29CE484222325
    for b in data:
        x = ((x ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return x


def test_offsets_outside_the_layout_are_refused_even_with_a_valid_checksum(segname):
    """A header re-signed after its offsets were bent to point past the mapping."""
    Segment.create(segname, 8).close()
    path = segment_path(segname)
    with open(path, "rb") as f:
        head = bytearray(f.read(CHECKSUM + 8))
    struct.pack_into("<Q", head, 96, 1 << 40)  # off_ring far outside the file
    struct.pack_into("<Q", head, CHECKSUM, _fnv1a(bytes(head[8:CHECKSUM])))
    _patch(path, 0, bytes(head))
    with pytest.raises(errors.SegmentCorrupt):
        Segment.attach(segname)
    # and the same header with the true offset back is accepted: the checksum check is real
    Segment.create(segname + "x", 8).close()
    with open(segment_path(segname + "x"), "rb") as f:
        good = f.read(CHECKSUM + 8)
    Segment.unlink(segname + "x")
    head[96:104] = good[96:104]
    struct.pack_into("<Q", head, CHECKSUM, _fnv1a(bytes(head[8:CHECKSUM])))
    _patch(path, 0, bytes(head))
    Segment.attach(segname).close()


# ---- fuzzing the attach path -------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_GOOD_HEADER: dict = {}
_LOCK_AT = 192      # the mutex sits on the first cache line after the immutable fields
_HEADER_END = 1024  # the header, mutable counters and event words all sit below this


def _good_header() -> bytes:
    if not _GOOD_HEADER:
        name = f"fuzz-template-{os.getpid()}"
        Segment.create(name, 8, req_bytes=4096).close()  # a small file, written once per example
        with open(segment_path(name), "rb") as f:
            _GOOD_HEADER["bytes"] = f.read()
        Segment.unlink(name)
    return _GOOD_HEADER["bytes"]


def _attach_bytes(segname: str, data: bytes) -> None:
    path = segment_path(segname)
    if os.path.exists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)
    try:
        seg = Segment.attach(segname, wait=0)
    except errors.SegmentError:
        return  # a typed refusal is the point
    try:
        seg.verify()  # what attach let through must still not crash the checker
    except errors.SegmentError:
        seg.close()
        return
    try:  # and what verify passes is safe to operate on
        seg.push(10**6, prio=1)
        seg.peek_worst()
        seg.pop(1)
        seg.expire(2**62)
        head, _ = seg.req_bounds()
        seg.req_next(head)
        seg.req_reserve(100)
        seg.req_reclaim(2**62)
        seg.verify()
    except errors.EngineError:
        pass
    finally:
        seg.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=4096))
def test_attach_random_bytes_never_crashes(segname, data):
    _attach_bytes(segname, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, _HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(0, 8192))
def test_attach_mutated_header_never_crashes(segname, edits, cut):
    """Start from a real header so that mutations reach the checksum and layout checks."""
    data = bytearray(_good_header())
    for off, val in edits:
        if _LOCK_AT <= off < _LOCK_AT + 64:
            continue  # the mutex word: a forged owner would block a locker, by design of the OS
        data[off] = val
    if cut is not None:
        data = data[:cut]
    _attach_bytes(segname, bytes(data))


def test_counters_outside_the_table_are_refused_at_attach(segname):
    """ready_n scribbled past capacity would send a pop outside the mapping."""
    seg = Segment.create(segname, 8)
    for id in (1, 2, 3):
        seg.push(id)
    seg.close()
    path = segment_path(segname)
    READY_N = 288  # after the 64-byte-aligned mutex: next_seq, next_id, req_tail, free_head, nfree, ready_n
    with open(path, "rb") as f:
        f.seek(READY_N)
        assert struct.unpack("<I", f.read(4))[0] == 3, "header layout moved; update READY_N"
    _patch(path, READY_N, struct.pack("<I", 0xFFFFFF00))
    with pytest.raises(errors.SegmentCorrupt):
        Segment.attach(segname)


def test_a_mapped_segment_is_in_use_until_every_view_closes_and_names_what_it_was_given(segname):
    from engine import shm
    a = Segment.create(segname, 16, note=b"/some/where/q.db")
    b = Segment.attach(segname)
    assert shm.read_note(a.path) == b"/some/where/q.db"
    a.close()
    assert not shm.unused(b.path, unlink=True) and os.path.exists(b.path), "b still maps it"
    b.close()
    assert shm.unused(b.path) and os.path.exists(b.path)
    c = Segment.attach(segname)
    path = c.path
    del c  # dropped without close(), as a reconnect leaves the old view
    gc.collect()
    assert shm.unused(path), "a collected view holds nothing"
    assert shm.unused(b.path, unlink=True) and not os.path.exists(b.path)
    with pytest.raises(errors.InvalidArgument, match="note"):
        Segment.create(segname, 16, note=b"x" * (shm.NOTE_MAX + 1))
    assert not os.path.exists(segment_path(segname))
