"""cffi build script for the native core (API mode).

It lives outside the package so that the package never imports a module
that has not been built.  One cdef file per C area is read: those of the
shared types first, then the rest in sorted order.
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Optional

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["fault.c", "group.c", "heap.c", "hset.c", "jobcache.c", "ops.c", "plain.c", "reqring.c", "segment.c", "slots.c", "turn.c", "wait.c"]


def _sqlite_headers() -> Optional[str]:
    """The directory of SQLite's extension header, if there is one (the
    writer's C turn needs it; without it the turn runs in Python)."""
    import sysconfig
    dirs = [os.environ.get("HEADRACE_SQLITE_INCLUDE", ""), "/usr/include", "/usr/local/include",
            sysconfig.get_config_var("INCLUDEDIR") or ""]
    return next((d for d in dirs if d and os.path.exists(os.path.join(d, "sqlite3ext.h"))), None)


SQLITE = _sqlite_headers()
ffibuilder = FFI()
#: The types every other area uses come first.
FIRST = ["status.cdef", "layout.cdef"]
CDEFS = [HERE / "cdef" / name for name in FIRST] + sorted(
    p for p in (HERE / "cdef").glob("*.cdef") if p.name not in FIRST)
for cdef in CDEFS:
    ffibuilder.cdef(cdef.read_text())

ffibuilder.set_source(
    "engine._core",
    '#include "headrace.h"',
    sources=[str((HERE / s).relative_to(HERE.parent)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent))] + ([SQLITE] if SQLITE else []),
    define_macros=[("HR_HAVE_SQLITE", "1")] if SQLITE else [],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fvisibility=hidden"],
    libraries=["pthread", "m"] if sys.platform.startswith("linux") else [],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
