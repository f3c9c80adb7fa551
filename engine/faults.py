"""Fault injection for crash tests (off unless a test switches it on).

``HEADRACE_FAULT=site:hit`` in the environment, read once at import, makes
this process kill itself with SIGKILL at the `hit`-th time it reaches
`site` while holding the segment lock.  ``HEADRACE_FAULT=count`` only counts.
"""
from __future__ import annotations

import os
from typing import Dict

from . import errors
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
    "repair": lib.HR_FS_REPAIR,
}


def arm(site: str, hit: int = 1) -> None:
    """Kill this process at the `hit`-th pass through `site`."""
    if site not in SITES:
        raise errors.InvalidArgument(f"unknown fault site {site!r}; known: {', '.join(SITES)}")
    lib.hr_fault_arm(SITES[site], hit)


def count(on: bool = True) -> None:
    """Count passes through every site without killing."""
    lib.hr_fault_count(1 if on else 0)


def hits(site: str) -> int:
    """Passes through `site` so far in this process (while counting or armed)."""
    return int(lib.hr_fault_hits(SITES[site]))


def _from_env() -> None:
    spec = os.environ.get("HEADRACE_FAULT", "")
    if not spec:
        return
    if spec == "count":
        count(True)
        return
    site, _, hit = spec.partition(":")
    arm(site, int(hit or 1))


_from_env()
