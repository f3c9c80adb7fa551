"""Fault injection for crash tests (off unless a test switches it on).

``HEADRACE_FAULT=site:hit`` in the environment, read once at import, makes
this process kill itself with SIGKILL at the `hit`-th time it reaches
`site` while holding the segment lock.  ``HEADRACE_FAULT=count`` only counts.

Python-level sites work the same way through their own variables:
``HEADRACE_WRITER_FAULT`` in the writer ("commit": inside its transaction,
before COMMIT; "committed": after COMMIT, before the segment shows it) and
``HEADRACE_PRODUCER_FAULT`` in a submitting process ("chunk_write": a chunk
half-written into the request area; "chunk_sent": published, before its
answer).  With ``HEADRACE_FAULT_LOG=path``, a Python-level site that fires
appends its name there first (the test run checks every site fired).

``HEADRACE_TEST_VFS=PATH`` makes the writer open its database through a
VFS whose writes fail with SQLITE_FULL while ``PATH.full`` exists, and with
SQLITE_IOERR while ``PATH.ioerr`` exists: a disk that fills up and empties.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Dict, List, Optional

from . import errors, paths
from ._core import lib

#: Site name -> C site number; one per locked operation, plus the repair.
SITES: Dict[str, int] = {
    "insert": lib.HR_FS_INSERT,
    "claim": lib.HR_FS_CLAIM,
    "finish": lib.HR_FS_FINISH,
    "cancel": lib.HR_FS_CANCEL,
    "heartbeat": lib.HR_FS_HEARTBEAT,
    "expire": lib.HR_FS_EXPIRE,
    "promote": lib.HR_FS_PROMOTE,
    "evict": lib.HR_FS_EVICT,
    "mark_dirty": lib.HR_FS_MARK_DIRTY,
    "advance": lib.HR_FS_ADVANCE,
    "dedup_insert": lib.HR_FS_DEDUP_INSERT,
    "dedup_delete": lib.HR_FS_DEDUP_DELETE,
    "req_reserve": lib.HR_FS_REQ_RESERVE,
    "group": lib.HR_FS_GROUP,
    "repair": lib.HR_FS_REPAIR,
}
#: Sites of the writer's C turn for plain submits (no lock held): its rows
#: inserted, before COMMIT; and after COMMIT, before the segment shows them.
TURN_SITES: Dict[str, int] = {
    "turn_commit": lib.HR_FS_TURN_COMMIT,
    "turn_committed": lib.HR_FS_TURN_COMMITTED,
}
_ALL_SITES = {**SITES, **TURN_SITES}


def arm(site: str, hit: int = 1) -> None:
    """Kill this process at the `hit`-th pass through `site`."""
    if site not in _ALL_SITES:
        raise errors.InvalidArgument(f"unknown fault site {site!r}; known: {', '.join(_ALL_SITES)}")
    lib.hr_fault_arm(_ALL_SITES[site], hit)


def count(on: bool = True) -> None:
    """Count passes through every site without killing."""
    lib.hr_fault_count(1 if on else 0)


def hits(site: str) -> int:
    """Passes through `site` so far in this process (while counting or armed)."""
    return int(lib.hr_fault_hits(_ALL_SITES[site]))


#: Python-level site -> the variable that arms it.
PY_SITES: Dict[str, str] = {
    "commit": "HEADRACE_WRITER_FAULT",
    "committed": "HEADRACE_WRITER_FAULT",
    "chunk_write": "HEADRACE_PRODUCER_FAULT",
    "chunk_sent": "HEADRACE_PRODUCER_FAULT",
}
#: Armed Python-level sites: site -> [hit at which to die, hits so far].
_armed: Dict[str, List[int]] = {}


def point(site: str) -> None:
    """A Python-level injection site: dies here if armed for this pass."""
    a = _armed.get(site)
    if a is None:
        return
    a[1] += 1
    if a[1] >= a[0]:
        log = os.environ.get("HEADRACE_FAULT_LOG")
        if log:
            paths.append(log, f"{site}\n")
        os.kill(os.getpid(), signal.SIGKILL)


_vfs: Any = None


def test_vfs() -> Optional[str]:
    """The name of the failing VFS if ``HEADRACE_TEST_VFS`` asks for it (registered once), else None."""
    global _vfs
    ctl = os.environ.get("HEADRACE_TEST_VFS")
    if not ctl:
        return None
    if _vfs is None:
        import apsw

        class File(apsw.VFSFile):
            def xWrite(self, data: bytes, offset: int) -> None:
                if os.path.exists(ctl + ".full"):
                    raise apsw.FullError("database or disk is full (HEADRACE_TEST_VFS)")
                if os.path.exists(ctl + ".ioerr"):
                    raise apsw.IOError("disk I/O error (HEADRACE_TEST_VFS)")
                super().xWrite(data, offset)

        class VFS(apsw.VFS):
            def __init__(self) -> None:
                super().__init__("headrace-test-faults", "")

            def xOpen(self, name: Any, flags: List[int]) -> apsw.VFSFile:
                return File("", name, flags)

        _vfs = VFS()
    return "headrace-test-faults"


def _from_env() -> None:
    for var in set(PY_SITES.values()):
        site, _, hit = os.environ.get(var, "").partition(":")
        if site:
            if PY_SITES.get(site) != var:
                raise errors.InvalidArgument(f"{var}={site!r}: unknown site; known: "
                                             f"{', '.join(s for s, v in PY_SITES.items() if v == var)}")
            _armed[site] = [int(hit or 1), 0]
    spec = os.environ.get("HEADRACE_FAULT", "")
    if not spec:
        return
    if spec == "count":
        count(True)
        return
    site, _, hit = spec.partition(":")
    arm(site, int(hit or 1))


_from_env()
